"""One TRL GRPO run for the benchmark, in TRL's own venv: `benchmarks/.venv-trl/bin/python -m benchmarks.grpo_trl
SPEC.json OUT.json`.

The same work as benchmarks/grpo_raylign.py: the spec's policy (its saved dir, so TRL loads the reference from it
for the KL term), the task's training prompts, G samples per prompt up to the same number of new tokens (EOS ends a
sample earlier), the gold reward, one AdamW update per step over all P x G samples in micro-batches of the same
size, a constant learning rate, the same KL coefficient and clip range. TRL's defaults otherwise: generation with
transformers `generate`, the loss normalized by the step's tokens ("dapo", as raylign's token-mean), group-std
reward scaling. Writes the same event file as the raylign run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

STARTED = time.time()


def main(spec_path: str, out_path: str) -> None:
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from pipeline.tasks.language import gold_reward  # pure Python: the task's gold reward, as raylign scores it

    spec = json.loads(Path(spec_path).read_text())
    samples = spec["prompts_per_step"] * spec["samples_per_prompt"]
    table = pq.read_table(spec["prompts"]).to_pydict()
    prompts = [p for p, s in zip(table["prompt"], table["split"], strict=True) if s == "train"]
    events: dict = {"started": STARTED, "imported": time.time(), "steps": [], "evals": []}

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            events["ready"] = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            events["steps"].append({"time": time.time(), "step": state.global_step, "samples": float(samples)})

        def on_log(self, args, state, control, logs=None, **kwargs):
            step = events["steps"][-1] if events["steps"] else None
            if step is None or not logs or "completions/mean_length" not in logs:
                return
            step["tokens"] = logs["completions/mean_length"] * samples
            step["reward/mean"] = logs.get("reward")
            step["kl/ref"] = logs.get("kl")
            seconds = step["time"] - (events["steps"][-2]["time"] if len(events["steps"]) > 1 else events["ready"])
            print(f"trl step {step['step']}: {samples / seconds:.1f} samples/s", flush=True)

    def gold(prompts, completions, **kwargs):
        return gold_reward(prompts, completions)

    run_dir = Path(spec["run_dir"])
    args = GRPOConfig(
        output_dir=str(run_dir),
        use_cpu=True,
        bf16=False,
        seed=spec["seed"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        optim="adamw_torch",
        max_grad_norm=1.0,
        per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=samples // spec["micro_batch_size"],
        num_generations=spec["samples_per_prompt"],
        max_completion_length=spec["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=spec["kl_coef"],
        epsilon=0.2,
        num_iterations=1,
        loss_type="dapo",
        model_init_kwargs={"dtype": torch.float32},
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=spec["policy"],
        reward_funcs=gold,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=AutoTokenizer.from_pretrained(spec["policy"]),
        callbacks=[Timer()],
    )
    trainer.train()
    events["finished"] = time.time()
    events["torch_threads"] = torch.get_num_threads()
    Path(out_path).write_text(json.dumps(events, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
