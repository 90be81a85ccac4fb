"""The experience stream's routing processes stay torch-free: the Feed actor, the read task and the split
coordinator load pipeline.stream and unpickle the chunks' payload classes (pipeline.types), and neither may import
torch, which would put its memory in each of those processes."""

from __future__ import annotations

import pickle
import subprocess
import sys

from pipeline.types import ExperienceItem, PromptBatch


def test_the_stream_and_its_payload_types_import_without_torch():
    item = ExperienceItem(step=1, chunk=0, kl_coef=0.1, prompts=PromptBatch(["a prompt"], 4, seed=7))
    # what the Feed actor and the read task do: import the stream's module and unpickle a queued chunk
    code = (
        "import pickle, sys\n"
        "import pipeline.stream\n"
        f"item = pickle.loads({pickle.dumps(item)!r})\n"
        "assert item.prompts.prompts == ['a prompt'] and item.prompts.seed == 7, item\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'vllm', 'deepspeed') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the stream's routing side imported {out.stdout.strip()}"
