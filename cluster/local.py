"""Local Ray nodes on 127.0.0.1 for `make cluster-up` / `make cluster-down` and the multi-node tests.

Each node is a `ray start --block` child process with its own temp dir and ports, and token auth on. Stopping
one sends SIGTERM to that process (Ray then stops the processes it started), and afterwards kills any process left
whose command line names the node's temp dir: never `ray stop`, which would stop every Ray on the machine.

    python -m cluster.local up [--temp-dir DIR] [--port 6379] [--dashboard-port 8265] [--num-cpus 8]
    python -m cluster.local down [--temp-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TEMP_DIR = Path("/tmp/raylign-head")  # Ray's socket paths must stay short (< 108 bytes)
STARTED = "Ray runtime started"


LISTEN_PORTS = (20000, 32767)  # above Ray's worker ports (10002-19999), below the usual ephemeral range


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux's default where unreadable)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a server to start on soon, drawn outside the ephemeral range: a port
    bound and released inside it can go to any outgoing connection before the server binds it."""
    low, high = LISTEN_PORTS
    ephemeral_low, ephemeral_high = ephemeral_ports()
    if ephemeral_low <= high:
        high = ephemeral_low - 1
    if high < low:  # the ephemeral range starts below ours: take the ports above it
        low, high = ephemeral_high + 1, 65535
    draw = random.SystemRandom()
    for _ in range(200):
        port = draw.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {low}-{high} on {host or 'any address'}")


def master_address() -> tuple[str, int, str]:
    """(node IP, a free port, node id) of the node this runs on (a Ray task): where a learner's rank 0 will
    listen."""
    import ray

    return ray.util.get_node_ip_address(), free_port(""), ray.get_runtime_context().get_node_id()


@dataclass
class LocalNode:
    pid: int
    temp_dir: Path
    gcs_address: str  # host:port of the head's GCS (the `ray.init(address=...)` of a driver)
    dashboard_url: str | None  # the head's Jobs API; None for a worker node


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a node: token auth on, and this venv's bin first on PATH so that a job's `raylign` entrypoint
    runs with the interpreter the node runs with."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a node must not join another cluster
    # Nothing on a local node needs draining: without this, stopping it waits out Ray's drain timeout.
    env.update({"RAY_AUTH_MODE": "token", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **(extra or {})})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def start_node(
    temp_dir: Path,
    *,
    num_cpus: int,
    head_address: str | None = None,
    port: int | None = None,
    dashboard_port: int | None = None,
    resources: dict[str, float] | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 300.0,
    detach: bool = False,
) -> LocalNode:
    """Start a head (`head_address` None) or a worker node joining `head_address`; -> once it runs.
    Every port a second node on this machine could collide on is chosen free unless given."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [
        ray,
        "start",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--disable-usage-stats",
    ]
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    dashboard_url = None
    if head_address is None:
        port = port or free_port()
        dashboard_port = dashboard_port or free_port()
        cmd += [
            "--head",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--include-dashboard=true",
            f"--ray-client-server-port={free_port()}",
        ]
        head_address, dashboard_url = f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}"
    else:
        cmd.append(f"--address={head_address}")
    log = temp_dir / ("head.log" if dashboard_url else "node.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=node_env(env), start_new_session=detach)
    node = LocalNode(proc.pid, temp_dir, head_address, dashboard_url)
    deadline = time.monotonic() + timeout_s
    while STARTED not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_node(node)
            raise RuntimeError(f"ray start failed (exit {proc.poll()}); {log}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    if dashboard_url:
        wait_for_jobs_api(dashboard_url, deadline)
    return node


def wait_for_jobs_api(url: str, deadline: float) -> None:
    """The dashboard answers a while after the node starts; any HTTP answer from the Jobs API (401 included) will
    do."""
    import requests

    while True:
        try:
            if requests.get(f"{url}/api/jobs/", timeout=5).status_code in (200, 401, 403):
                return
        except requests.exceptions.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the dashboard at {url} did not answer")
        time.sleep(0.5)


def stop_node(node: LocalNode, timeout_s: float = 30.0) -> None:
    """SIGTERM the node's `ray start --block` (Ray stops what it started), then kill any process left that names
    the node's session dir on its command line."""
    import psutil

    try:
        proc = psutil.Process(node.pid)
        if f"--temp-dir={node.temp_dir}" in proc.cmdline():  # not a reused pid of some other process
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout_s)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        proc.kill()
    # Ray's own processes name their session dir (<temp dir>/session_<time>_<pid>) in their arguments.
    marker = f"{node.temp_dir}/session_"
    keep = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] not in keep and any(marker in arg for arg in p.info["cmdline"] or []):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--temp-dir", type=Path, default=DEFAULT_TEMP_DIR)
    parser.add_argument("--port", type=int, default=6379, help="GCS port of the head")
    parser.add_argument("--dashboard-port", type=int, default=8265, help="dashboard (Jobs API) port")
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs (the run's actors mostly wait)")
    args = parser.parse_args(argv)
    state = args.temp_dir / "raylign-head.json"
    if args.action == "down":
        if not state.exists():
            print(f"no local head recorded in {state}")
            return 0
        stop_node(LocalNode(**{**json.loads(state.read_text()), "temp_dir": args.temp_dir}))
        state.unlink()
        print(f"stopped the local head in {args.temp_dir}")
        return 0
    if state.exists():
        print(f"a local head is already recorded in {state}; `make cluster-down` first", file=sys.stderr)
        return 2
    from pipeline.submit import auth_token

    if auth_token()[0] is None:  # a token for the head and for `raylign submit`, in ~/.ray/auth_token
        subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    node = start_node(
        args.temp_dir, num_cpus=args.num_cpus, port=args.port, dashboard_port=args.dashboard_port, detach=True
    )
    state.write_text(
        json.dumps({"pid": node.pid, "gcs_address": node.gcs_address, "dashboard_url": node.dashboard_url})
    )
    print(f"local Ray head up (token auth, 127.0.0.1 only): dashboard {node.dashboard_url}, GCS {node.gcs_address}")
    print(f"  raylign submit configs/tiny_grpo.yaml --address {node.dashboard_url} --wait")
    return 0


if __name__ == "__main__":
    sys.exit(main())
