"""LoRA against full-parameter training in the offline stages, at the same number of updates: the sft stage's
held-out gold reward and the reward stage's held-out pair accuracy on the synthetic task, each from its own
`raylign run configs/tiny_irl.yaml` (stages synth, sft and, for the reward rows, reward), seed 0.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.lora_quality [--pairs-per-prompt 40] [--rank 8]

Reward models start from the SFT'd policy with a new head (`rm.init=policy`: a trained base, the case adapters
are for; `make run`'s default `rm.init=task` starts from a random-init model, where adapters have nothing to adapt).
The sft rows start from the task's random-init policy. Results go to
benchmarks/results/lora-quality-<time>.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from benchmarks import machine

ROOT = Path(__file__).resolve().parent.parent
RAYLIGN = str(Path(sys.executable).parent / "raylign")


def runs(rank: int, sft_lr_lora: float) -> dict[str, list[str]]:
    """name -> overrides of configs/tiny_irl.yaml."""
    lora = [f"lora.rank={rank}"]
    rm = ["stages=[synth,sft,reward]"]
    lora_sft = ["stages=[synth,sft]", "lora.stages=[sft]"]
    faster = f"sft.lr={sft_lr_lora}"
    return {
        "full: sft, reward (init policy)": [*rm, "rm.init=policy"],
        f"LoRA r{rank}: sft (lr as full)": [*lora_sft, *lora],
        f"LoRA r{rank}: sft (lr {sft_lr_lora:g})": [*lora_sft, *lora, faster],
        f"LoRA r{rank}: reward (init policy)": [*rm, *lora, "lora.stages=[rm]", "rm.init=policy"],
        # why LoRA SFT of the random-init policy fails: adapters of full rank, or on the output head as well
        f"LoRA r128 (full rank): sft (lr {sft_lr_lora:g})": [
            *lora_sft,
            "lora.rank=128",
            "lora.alpha=256",  # alpha / rank = 2, as rank 8 with the default alpha 16
            faster,
        ],
        f"LoRA r{rank} + lm_head: sft (lr {sft_lr_lora:g})": [
            *lora_sft,
            *lora,
            faster,
            "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]",
        ],
    }


def run_one(overrides: list[str], out: Path) -> dict:
    """One raylign run, its console lines echoed indented -> its summary.json."""
    cmd = [RAYLIGN, "run", "configs/tiny_irl.yaml", f"run.output_dir={out}", *overrides]
    lines = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the lines as they come, not a pipe buffer at a time
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            print(f"  {line.rstrip()}", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"raylign run {' '.join(overrides)} failed with exit code {proc.returncode}")
    run_dir = Path(lines[-1])
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--pairs-per-prompt", type=int, default=40, help="synth.pairs_per_prompt (make run: 160)")
    parser.add_argument("--sft-lr-lora", type=float, default=5e-3, help="the second LoRA sft row's sft.lr")
    parser.add_argument("--only", default="", help="run only the rows whose name contains this text")
    args = parser.parse_args()
    plan = {name: o for name, o in runs(args.rank, args.sft_lr_lora).items() if args.only in name}
    common = [f"synth.pairs_per_prompt={args.pairs_per_prompt}"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(plan.items()):
            print(f"lora_quality: {i + 1}/{len(plan)} {name}", flush=True)
            s = run_one([*common, *overrides], Path(tmp) / str(i))
            results[name] = {
                "overrides": [*common, *overrides],
                "sft_gold_reward": s.get("sft/gold_reward"),
                "rm_heldout_accuracy": s.get("rm/heldout_accuracy"),
                "bayes_optimal_accuracy": s.get("rm/bayes_optimal_accuracy"),
                "seconds": {k: v for k, v in s.items() if k in ("timing/sft", "timing/rm")},
            }
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = ROOT / "benchmarks/results" / f"lora-quality-{stamp}.json"
    path.write_text(json.dumps({"machine": machine.describe(), "args": vars(args), "runs": results}, indent=1))
    print("| run | sft held-out gold | reward held-out accuracy | seconds |\n|---|---|---|---|")
    for name, r in results.items():
        cells = [f"{r[k]:.3f}" if r[k] is not None else "" for k in ("sft_gold_reward", "rm_heldout_accuracy")]
        secs = ", ".join(f"{k.split('/')[1]} {v:.0f}" for k, v in r["seconds"].items())
        print(f"| {name} | {cells[0]} | {cells[1]} | {secs} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
