"""Shared fixtures. Nothing may be downloaded: HF_HUB_OFFLINE makes a hidden hub access fail loudly."""

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    """A small synthetic task (data, tokenizer, tiny models), written once per test session."""
    from pipeline.config import SynthConfig
    from pipeline.tasks.synthetic import write_task

    out = tmp_path_factory.mktemp("task")
    write_task(out, SynthConfig(num_prompts=64), seed=7, log=lambda _: None)
    return out


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests prove GPU code paths (docs/gpu.md): skipped, visibly, on a machine without a CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (docs/gpu.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
