"""The benchmark's inputs, built once under benchmarks/work/ (nothing is downloaded): the synthetic task with its
tokenizer, its tiny policy after SFT (so responses stop at EOS by themselves), and random-init Llama policies of
about 10M, 25M and 50M parameters with the same tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

WORK = Path(__file__).resolve().parent / "work"

# name -> (hidden size, layers). A layer holds 16 h^2 weights (attention 4 h^2, MLP of width 4h 12 h^2), plus 2 x 1024 h
# for the embeddings and LM head: 9.9M, 25.8M and 48.2M parameters; the task's own policy has 1.2M.
SIZES = {"10m": (384, 4), "25m": (512, 6), "50m": (768, 5)}


def task_dir() -> Path:
    return WORK / "task-run" / "task"


def tiny_sft_policy() -> Path:
    return WORK / "task-run" / "stages" / "sft" / "policy"


def policy(name: str) -> Path:
    """HF dir of a bench policy: "tiny" (task's policy after SFT), "tiny-init" (before SFT), or a SIZES key."""
    if name == "tiny":
        return Path(json.loads((WORK / "task-run" / "artifacts.json").read_text())["policy"])
    if name == "tiny-init":
        return task_dir() / "models" / "policy"
    return WORK / "models" / f"policy-{name}"


def build(log=print) -> dict:
    """Write the task (synth + SFT through `raylign run`) and the sized policies, unless already there.
    -> {policy name: parameter count}."""
    from transformers import AutoTokenizer

    from pipeline.config import load_config, to_yaml
    from pipeline.run import run_stages
    from pipeline.tasks.tiny_models import build_policy, num_parameters

    run_dir = WORK / "task-run"
    if (
        not (run_dir / "artifacts.json").exists()
        or "sft" not in json.loads((run_dir / "artifacts.json").read_text())["done"]
    ):
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = load_config(None, ["stages=[synth, sft]", "run.name=bench-task", "run.seed=0"])
        (run_dir / "config.yaml").write_text(to_yaml(cfg))  # a run dir, as `raylign run` writes it
        run_stages(cfg, run_dir, log=log)
    tokenizer = AutoTokenizer.from_pretrained(policy("tiny"))
    counts = {}
    for name, (hidden, layers) in SIZES.items():
        out = policy(name)
        if not (out / "config.json").exists():
            model = build_policy(tokenizer, hidden_size=hidden, layers=layers, seed=0)
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            counts[name] = num_parameters(model)
        else:
            counts[name] = _count(out)
    counts["tiny"] = _count(policy("tiny"))
    return counts


def _count(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


if __name__ == "__main__":
    print(json.dumps(build(), indent=1))
