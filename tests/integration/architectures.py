"""A user's own model and data, as the architecture matrix builds them: a tiny random-init causal LM of one
family (pipeline.tasks.tiny_models.ARCHITECTURES), the task's tokenizer with a chat template added, and prompts as
chat `messages` rows in JSONL."""

import json
from pathlib import Path

from transformers import AutoTokenizer

from pipeline.tasks.tiny_models import build_causal_lm, with_chat_template


def write_user_model(task_dir: Path, architecture: str, out: Path) -> Path:
    """-> the HF dir of a random-init `architecture` model with a chat-template tokenizer."""
    tokenizer = with_chat_template(AutoTokenizer.from_pretrained(task_dir / "models/policy"))
    model = build_causal_lm(architecture, tokenizer, hidden_size=128, layers=2, seed=0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_messages_prompts(task_dir: Path, out: Path, n: int = 24) -> Path:
    """The task's prompts as `messages` rows (one user turn each) in JSONL, with the task's split column."""
    import pyarrow.parquet as pq

    rows = pq.read_table(task_dir / "prompts.parquet").to_pylist()[:n]
    with out.open("w") as f:
        for r in rows:
            f.write(json.dumps({"messages": [{"role": "user", "content": r["prompt"]}], "split": r["split"]}) + "\n")
    return out
