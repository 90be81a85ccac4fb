"""The LR schedule of every engine (actors.training.engine.warmup_schedule) and the stage key that sets it."""

import pytest
import torch

from actors.training.engine import warmup_schedule
from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.conftest import REPO


def lrs(warmup: int, decay: int | None, updates: int) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule, out = warmup_schedule(optimizer, warmup, decay), []
    for _ in range(updates):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out


def test_constant_after_warmup():
    assert lrs(2, None, 5) == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])


def test_linear_decay_after_warmup_ends_one_step_above_zero():
    # 6 updates, 2 of them warmup: the other 4 at 4/4, 3/4, 2/4, 1/4 of lr; an update past the count gets 0
    assert lrs(2, 6, 7) == pytest.approx([1 / 3, 2 / 3, 1, 3 / 4, 2 / 4, 1 / 4, 0])
    assert lrs(0, 4, 4) == pytest.approx([1, 3 / 4, 2 / 4, 1 / 4])


def test_the_stage_key_takes_linear_and_names_itself_otherwise():
    cfg = load_config(REPO / "configs/tiny_irl.yaml", ["rm.lr_schedule=linear", "sft.lr_schedule=linear"])
    assert cfg.rm.lr_schedule == cfg.sft.lr_schedule == "linear" and cfg.dpo.lr_schedule == "constant"
    with pytest.raises(ConfigError, match="rm.lr_schedule"):
        load_config(REPO / "configs/tiny_irl.yaml", ["rm.lr_schedule=cosine"])
