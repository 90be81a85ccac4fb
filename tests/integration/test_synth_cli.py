"""`raylign synth` end to end: the console script writes the task, and vLLM generates from its policy on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def synth_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "task"
    raylign = Path(sys.executable).parent / "raylign"
    proc = subprocess.run(
        [str(raylign), "synth", "--out", str(out), "--seed", "3", "synth.num_prompts=64"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out.resolve())  # the path is the last line
    return out


def test_synth_writes_the_task(synth_out):
    info = json.loads((synth_out / "task.json").read_text())
    assert info["seed"] == 3 and info["rows"]["prompts"] == 64
    assert info["gold_reward"] == "pipeline.tasks.synthetic:gold_reward"
    for rel in info["files"].values():
        assert (synth_out / rel).exists()


def test_synth_is_deterministic_per_seed(synth_out, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.config import SynthConfig
    from pipeline.tasks.synthetic import write_task

    write_task(tmp_path, SynthConfig(num_prompts=64), seed=3, log=lambda _: None)
    for name in ("prompts.parquet", "preferences.parquet", "demos.parquet"):
        assert pq.read_table(tmp_path / name).equals(pq.read_table(synth_out / name))


def test_vllm_generates_from_the_synth_policy(synth_out):
    # In-process engine (NOTES.md): ~12 s to start on CPU instead of ~40 s with the multiprocess one.
    code = f"""
import os
from vllm import LLM, SamplingParams
llm = LLM(model={str(synth_out / "models/policy")!r}, distributed_executor_backend="uni", dtype="float32",
          kv_cache_memory_bytes=2**27, enforce_eager=True, seed=0)
outs = llm.generate(["veli ka bamo ?"] * 8, SamplingParams(max_tokens=12, temperature=1.0, seed=1, ignore_eos=True))
print("LENGTHS", [len(o.outputs[0].token_ids) for o in outs])
"""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LENGTHS [12, 12, 12, 12, 12, 12, 12, 12]" in proc.stdout
