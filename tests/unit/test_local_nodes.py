"""`cluster.local.stop_node` stops only the processes of its own node: those naming the node's session dir, and the
`ray start` process only if it names the node's temp dir (a stale pid may belong to anything by now)."""

import subprocess
import sys
import time

from cluster.local import LocalNode, stop_node


def sleeper(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *args])


def test_stop_node_kills_its_sessions_processes_and_nothing_else(tmp_path):
    temp = tmp_path / "head"
    ours = sleeper(f"--session-dir={temp}/session_2026_1")
    other_session = sleeper(f"--session-dir={tmp_path}/head2/session_2026_1")  # a node whose dir shares a prefix
    same_dir_not_ray = sleeper(f"RAY_HEAD_DIR={temp}")  # e.g. the `make cluster-down` that asked for the stop
    stale_pid = sleeper("not a ray start")
    try:
        stop_node(LocalNode(stale_pid.pid, temp, "127.0.0.1:1", None), timeout_s=5)
        time.sleep(0.5)
        assert ours.poll() is not None
        assert other_session.poll() is None and same_dir_not_ray.poll() is None and stale_pid.poll() is None
    finally:
        for p in (ours, other_session, same_dir_not_ray, stale_pid):
            p.kill()
            p.wait()
