"""`cluster.local.stop_node` stops only the processes of its own node: those naming the node's session dir, and the
`ray start` process only if it names the node's temp dir (a stale pid may belong to anything by now). `free_port`
gives ports that no outgoing connection can take before a server binds them."""

import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.local import LISTEN_PORTS, LocalNode, free_port, master_address, stop_node


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


def test_free_ports_lie_outside_the_ephemeral_range_and_can_be_listened_on():
    ephemeral_low, ephemeral_high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for host in ("127.0.0.1", ""):
        for _ in range(20):
            port = free_port(host)
            assert LISTEN_PORTS[0] <= port <= LISTEN_PORTS[1]  # above Ray's worker ports
            assert not ephemeral_low <= port <= ephemeral_high
            with socket.socket() as s:
                s.bind((host, port))
                s.listen()


def test_an_ephemeral_range_below_ours_moves_the_draw_above_it(monkeypatch):
    monkeypatch.setattr("cluster.local.ephemeral_ports", lambda: (1024, 60999))
    assert all(61000 <= free_port() <= 65535 for _ in range(20))


def test_free_port_never_gives_a_taken_port_and_says_so_when_none_is_left(monkeypatch):
    busy = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", busy))
        taken.listen()
        monkeypatch.setattr("cluster.local.LISTEN_PORTS", (busy, busy))
        with pytest.raises(RuntimeError, match=f"no free TCP port in {busy}-{busy} on 127.0.0.1"):
            free_port()


def test_the_learners_address_probe_imports_without_torch():
    """LearnerGroup runs cluster.local.master_address as a Ray task before its ranks start: the worker that runs
    it imports only that module, and torch, transformers or DeepSpeed there would add seconds to every RL start."""
    code = (
        "import pickle, sys\n"
        f"probe = pickle.loads({pickle.dumps(master_address)!r})\n"
        "assert probe.__name__ == 'master_address'\n"
        "print(','.join(sorted(m for m in ('torch', 'transformers', 'vllm', 'deepspeed') if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the probe's module imported {out.stdout.strip()}"
