"""`make bench`: every benchmark of issue 9 in one go, on this machine.

    .venv/bin/python -m benchmarks.run [--quick] [--only grpo,rollout,sync,memory,async,peak]

1. end-to-end GRPO, raylign vs TRL's GRPOTrainer (its own venv, benchmarks/.venv-trl), alternated, per policy
2. rollout tokens/s, vLLM worker vs the HF generate backend, batch 8 / 64 / 256
3. where a raylign step's time goes (from the runs of 1) and weight-sync seconds for ~1M / 10M / 50M models
4. learner memory per rank, ZeRO 0 / 2 / 3 with 1 and 2 learners, ~50M model, and LoRA rank 8 rows; one learner
   rank's update time on ZeRO-0 / ZeRO-2 / torch, and packed against padded (`engines`)
5. sync vs async rollout: samples/s and held-out gold reward after the same number of samples
6. peak memory (RSS summed over the driver and every Ray process) of `make run`

Every part runs in a process of its own (a fresh Ray each time). Results go to benchmarks/results/bench-<time>.json
(with the machine and the load average), then benchmarks/report.py regenerates benchmarks/RESULTS.md and the
README's table. `--quick` shrinks every size to check the harness, not to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from benchmarks import machine, models
from benchmarks.analysis import summarize

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
PY = sys.executable
TRL_PY = str(BENCH / ".venv-trl" / "bin" / "python")
SECTIONS = ("grpo", "rollout", "sync", "engines", "memory", "async", "peak")
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
    "PYTHONPATH": str(ROOT),
    "VLLM_LOGGING_LEVEL": "WARNING",
}

# The shared GRPO work per policy: prompts x samples per prompt, response length cap (EOS ends earlier), steps.
# The first WARMUP steps and the last (it writes raylign's checkpoint) are left out of the steady state.
GRPO = {
    "tiny": {"prompts_per_step": 32, "samples_per_prompt": 8, "max_new_tokens": 32, "steps": 8, "rounds": 3},
    "25m": {"prompts_per_step": 8, "samples_per_prompt": 8, "max_new_tokens": 32, "steps": 6, "rounds": 2},
}
# One more raylign run on these policies with LoRA rank 8 on the RL learners: its samples/s and its `sync/bytes`
# (the adapter alone) against the full-parameter runs'.
LORA = {"25m": ["lora.rank=8", "lora.stages=[rl]"]}
COMMON = {"lr": 1e-4, "kl_coef": 0.05, "micro_batch_size": 16, "seed": 0, "eval_prompts": 8}
WARMUP = 2
ASYNC = {
    "policy": "tiny",
    "prompts_per_step": 32,
    "samples_per_prompt": 8,
    "max_new_tokens": 32,
    "steps": 12,
    "eval_prompts": 64,
}
QUICK = {"prompts_per_step": 8, "samples_per_prompt": 4, "max_new_tokens": 16, "steps": 4, "rounds": 1}
# --short: the same work per step, fewer steps and rounds, for a machine that cannot spare ~30 minutes.
SHORT = {"tiny": {"steps": 5, "rounds": 1}, "25m": {"steps": 5, "rounds": 1}}


def sh(cmd: list[str], log: Path, timeout: float = 1800, check: bool = True, retry: bool = True) -> int:
    """Run a command with the bench environment, its output teed into `log`. -> exit code (raises on failure
    when `check`)."""
    print(f"bench: $ {' '.join(cmd)}", flush=True)
    with log.open("a") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if line.startswith(("raylign step", "trl step", "rollout ", "sync:", "engines:", "memory:", "peak memory")):
                print("  " + line.rstrip(), flush=True)
        proc.wait(timeout=timeout)
    if proc.returncode and check and retry:
        print(f"bench: exited {proc.returncode}; trying once more", flush=True)
        return sh(cmd, log, timeout, check, retry=False)
    if proc.returncode and check:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; see {log}")
    return proc.returncode


def grpo_run(tool: str, spec: dict, out_dir: Path, tag: str, log: Path) -> dict:
    spec = {**spec, "run_dir": str(out_dir / f"run-{tag}")}
    spec_file, out = out_dir / f"spec-{tag}.json", out_dir / f"events-{tag}.json"
    spec_file.write_text(json.dumps(spec))
    python, module = (PY, "benchmarks.grpo_raylign") if tool == "raylign" else (TRL_PY, "benchmarks.grpo_trl")
    for _ in range(2):  # a second try when a loaded machine made Ray's start-up time out
        launched = time.time()
        code = sh([python, "-m", module, str(spec_file), str(out)], log, check=False)
        if out.exists():
            break
    if not out.exists():
        raise RuntimeError(f"{tool} run {tag} exited {code} before writing its results; see {log}")
    if code:
        print(f"bench: {tool} run {tag} finished its steps but exited {code} at shutdown", flush=True)
    return {"tool": tool, "launched": launched, "exit_code": code, **json.loads(out.read_text())}


def section_grpo(out_dir: Path, log: Path, quick: bool, short: bool = False) -> dict:
    prompts = str(models.task_dir() / "prompts.parquet")
    result = {"warmup_steps": WARMUP, "common": COMMON, "policies": {}}
    for name, sizes in GRPO.items():
        sizes = {**sizes, **QUICK} if quick else {**sizes, **SHORT[name]} if short else sizes
        spec = {
            **COMMON,
            **{k: v for k, v in sizes.items() if k != "rounds"},
            "policy": str(models.policy(name)),
            "prompts": prompts,
        }
        runs = []
        for r in range(sizes["rounds"]):
            order = ("raylign", "trl") if r % 2 == 0 else ("trl", "raylign")  # alternate who goes first
            for tool in order:
                runs.append({"round": r, **grpo_run(tool, spec, out_dir, f"{name}-{tool}-{r}", log)})
        if name in LORA:
            lora = grpo_run("raylign", {**spec, "overrides": LORA[name]}, out_dir, f"{name}-lora", log)
            runs.append({"round": 0, **lora, "tool": "raylign-lora"})
        result["policies"][name] = {"spec": spec, "runs": runs}
    return result


def section_rollout(out_dir: Path, log: Path, quick: bool) -> dict:
    batches, repeats, rounds = ("8", "1", 1) if quick else ("8,64,256", "3", 2)
    policy = str(models.policy("tiny-init" if quick else "25m"))
    runs = []
    for r in range(rounds):
        for engine in ("vllm", "hf") if r % 2 == 0 else ("hf", "vllm"):
            out = out_dir / f"rollout-{engine}-{r}.json"
            sh(
                [
                    PY,
                    "-m",
                    "benchmarks.rollout",
                    engine,
                    policy,
                    str(models.task_dir() / "prompts.parquet"),
                    str(out),
                    batches,
                    repeats,
                ],
                log,
            )
            runs.append({"round": r, **json.loads(out.read_text())})
    return {"policy": policy, "runs": runs}


def section_sync(out_dir: Path, log: Path, quick: bool) -> dict:
    names = ["tiny-init"] if quick else ["tiny-init", "10m", "50m"]
    out = out_dir / "sync.json"
    sh([PY, "-m", "benchmarks.sync", str(out), *[f"{n}={models.policy(n)}" for n in names]], log)
    return {"models": json.loads(out.read_text())}


def section_engines(out_dir: Path, log: Path, quick: bool) -> dict:
    names, steps = (["tiny-init"], "2") if quick else (["tiny", "25m"], "6")
    out = {}
    for name in names:
        path = out_dir / f"engines-{name}.json"
        sh([PY, "-m", "benchmarks.engines", str(models.policy(name)), str(path), steps], log)
        out[name] = json.loads(path.read_text())
    return {"policies": out}


def section_memory(out_dir: Path, log: Path, quick: bool) -> dict:
    out = out_dir / "memory.json"
    args = [str(models.policy("tiny-init")), str(out), "3", "2"] if quick else [str(models.policy("50m")), str(out)]
    sh([PY, "-m", "benchmarks.memory", *args], log)
    return {"policy": "tiny-init" if quick else "50m", "rows": json.loads(out.read_text())}


def section_async(out_dir: Path, log: Path, quick: bool, short: bool = False) -> dict:
    sizes = {**ASYNC, **QUICK, "eval_prompts": 8} if quick else {**ASYNC, "steps": 6} if short else ASYNC
    spec = {
        **COMMON,
        **sizes,
        "policy": str(models.policy(sizes["policy"])),
        "gold": True,
        "prompts": str(models.task_dir() / "prompts.parquet"),
    }
    runs = {}
    for mode, extra in (("sync", []), ("async", ["rollout.max_staleness=1", "algo.tis_cap=2.0"])):
        runs[mode] = grpo_run(
            "raylign", {**spec, "async": mode == "async", "overrides": extra}, out_dir, f"async-{mode}", log
        )
    return {"spec": spec, "runs": runs}


def section_peak(out_dir: Path, log: Path, quick: bool) -> dict:
    out = out_dir / "peak.json"
    has_target = "\nrun:" in (ROOT / "Makefile").read_text()
    if quick:
        cmd = [
            str(ROOT / ".venv/bin/raylign"),
            "run",
            "configs/tiny_irl.yaml",
            "run.max_steps=2",
            "run.output_dir=benchmarks/work/runs",
            "synth.num_prompts=64",
            "sft.epochs=1",
        ]
    elif has_target:
        cmd = ["make", "run"]
    else:
        cmd = [str(ROOT / ".venv/bin/raylign"), "run", "configs/tiny_irl.yaml"]
    sh([PY, "-m", "benchmarks.peak_memory", str(out), *cmd], log, timeout=3600)
    return json.loads(out.read_text())


def run_section(name: str, out_dir: Path, log: Path, args: argparse.Namespace) -> dict:
    if name == "grpo":
        return section_grpo(out_dir, log, args.quick, args.short)
    if name == "async":
        return section_async(out_dir, log, args.quick, args.short)
    return RUNNERS[name](out_dir, log, args.quick)


RUNNERS = {
    "grpo": section_grpo,
    "rollout": section_rollout,
    "sync": section_sync,
    "engines": section_engines,
    "memory": section_memory,
    "async": section_async,
    "peak": section_peak,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness, measures nothing")
    parser.add_argument("--short", action="store_true", help="fewer steps and rounds (same work per step)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    args = parser.parse_args()
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown sections {sorted(unknown)}; known: {SECTIONS}")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = models.WORK / f"bench-{stamp}"
    out_dir.mkdir(parents=True)
    log = out_dir / "bench.log"
    print(f"bench: load average {machine.load_average()}; logs in {log}", flush=True)
    started = time.time()
    subprocess.run(["bash", str(BENCH / "setup_trl.sh")], check=True)
    sh([PY, "-m", "benchmarks.models"], log)
    results = {
        "created": datetime.now().isoformat(timespec="seconds"),
        "command": "make bench" if len(sys.argv) == 1 else "python -m benchmarks.run " + " ".join(sys.argv[1:]),
        "quick": args.quick,
        "machine": machine.describe(),
        "versions": {"raylign": machine.versions(), "trl_venv": machine.versions(TRL_PY)},
        "parameters": models.build(log=lambda _: None),
        "load_average": {"start": machine.load_average()},
        "seconds": {},
    }
    from benchmarks.report import print_targets, write_reports

    # A quick run checks the harness: its file stays in work/ and leaves RESULTS.md and README alone. The file
    # and the reports are rewritten after every part, so an interrupted run still leaves what it measured.
    path = (out_dir / "results-quick.json") if args.quick else BENCH / "results" / f"bench-{stamp}.json"
    for i, name in enumerate(only):
        t = time.time()
        results[name] = run_section(name, out_dir, log, args)
        results["seconds"][name] = time.time() - t
        results["load_average"][name] = machine.load_average()
        results["load_average"]["end"] = machine.load_average()
        results["seconds"]["total"] = time.time() - started
        results["complete"] = i == len(only) - 1
        results["summary"] = summarize(results)
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"bench: wrote {path}", flush=True)
        if not args.quick:
            write_reports(path)
    print_targets(results)


if __name__ == "__main__":
    main()
