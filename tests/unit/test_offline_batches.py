"""The pure pieces of the offline stages (no Ray): collation of string rows into token batches, the SFT loss (by
hand, on a bigram model whose logits we choose), pair layouts, and the stage configs' checks."""

import math

import pytest
import torch
from transformers import AutoTokenizer

from actors.sequences import response_logprobs
from actors.training.objectives import PAIR_LOSSES, interleave, pair_sequence_batch, score_batch, sequence_batch
from pipeline.algo import sft_loss
from pipeline.batches import rows
from pipeline.config import DpoConfig, load_config
from pipeline.errors import ConfigError
from pipeline.stages.offline import check_batch_size, describe, last_epoch


class Bigram(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: the next-token distribution depends on the current token only."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_sft_loss_counts_response_tokens_only_by_hand():
    # vocab of 5; token 0 pads. Row 0: prompt [1, 2], response [3, 4]; row 1: prompt [2], response [4].
    table = torch.tensor([[0.0] * 5, [0, 0, 3, 0, 0], [0, 1, 0, 2, 0], [0, 0, 0, 0, 4.0], [1, 0, 0, 0, 0]])
    prompt_ids = torch.tensor([[1, 2], [0, 2]])
    prompt_mask = prompt_ids != 0
    response_ids = torch.tensor([[3, 4], [4, 0]])
    response_mask = torch.tensor([[True, True], [True, False]])
    logprobs = response_logprobs(Bigram(table), prompt_ids, prompt_mask, response_ids, response_mask)
    loss, metrics = sft_loss(logprobs, response_mask)

    def lp(prev: int, tok: int) -> float:
        return torch.log_softmax(table[prev], -1)[tok].item()

    # three response tokens: 3 after 2, 4 after 3 (row 0) and 4 after 2 (row 1); the prompt's own tokens and the
    # padded position add nothing
    expected = -(lp(2, 3) + lp(3, 4) + lp(2, 4)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["sft/tokens"] == 3


def test_sft_loss_ignores_what_the_model_says_about_prompt_tokens():
    table = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    response_ids, response_mask = torch.tensor([[3, 5]]), torch.tensor([[True, True]])
    losses = []
    for first in (1, 4):  # a different earlier prompt token: the bigram model's prompt-token predictions change
        prompt_ids = torch.tensor([[first, 2]])
        logprobs = response_logprobs(Bigram(table), prompt_ids, prompt_ids > 0, response_ids, response_mask)
        losses.append(sft_loss(logprobs, response_mask)[0].item())
    assert losses[0] == losses[1]


@pytest.fixture(scope="module")
def tokenizer(task_dir):
    return AutoTokenizer.from_pretrained(task_dir / "models/policy")


def test_sequence_batch_adds_bos_to_prompts_and_eos_to_responses(tokenizer):
    prompts, responses = ["veli ka bamo ?", "sono lo tiru ka bamo ?"], [" ka bamo selu .", " lo tiru ."]
    batch = sequence_batch(tokenizer, prompts, responses)
    assert batch.prompt_ids.shape[0] == batch.response_ids.shape[0] == 2
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i]].tolist()
        response = batch.response_ids[i][batch.response_mask[i]].tolist()
        assert prompt == tokenizer(p).input_ids and prompt[0] == tokenizer.bos_token_id
        assert response == tokenizer(r, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        assert tokenizer.decode(response, skip_special_tokens=True) == r
    # prompts are left-padded (they end at the last column), responses right-padded
    assert batch.prompt_mask[:, -1].all() and batch.response_mask[:, 0].all()
    assert not batch.prompt_mask[0, 0] and not batch.response_mask[1, -1]


def test_pairs_are_interleaved_and_micro_batches_keep_them_whole(tokenizer):
    assert interleave(["a", "b"], ["x", "y"]) == ["a", "x", "b", "y"]
    prompts, chosen, rejected = ["p1 ?", "p2 ?", "p3 ?"], [" c1 .", " c2 .", " c3 ."], [" r1 r1 .", " r2 .", " r3 ."]
    batch = pair_sequence_batch(tokenizer, prompts, chosen, rejected)
    assert len(batch) == 6
    decoded = tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
    assert decoded == [" c1 .", " r1 r1 .", " c2 .", " r2 .", " c3 .", " r3 ."]
    assert len(rows(batch, 2, 4)) == 2  # an even slice is one whole pair

    scores = score_batch(tokenizer, prompts, chosen, rejected)
    texts = tokenizer.batch_decode(scores.input_ids, skip_special_tokens=True)
    assert texts[0::2] == [p + c for p, c in zip(prompts, chosen, strict=True)]
    assert texts[1::2] == [p + r for p, r in zip(prompts, rejected, strict=True)]
    assert scores.response_mask.any(dim=-1).sum() == 6  # accumulate_update's units: one per row


def test_dpo_label_smoothing_needs_the_sigmoid_loss():
    assert DpoConfig(label_smoothing=0.1).label_smoothing == 0.1
    with pytest.raises(ValueError, match="label_smoothing = 0.1 is only defined for loss_type=sigmoid"):
        DpoConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="dpo.label_smoothing"):
        load_config(None, ["dpo.label_smoothing=0.5"])  # 0.5 would make the loss ignore the labels


def test_global_batch_must_split_into_equal_worker_shares():
    check_batch_size("sft.batch_size", 32, 2)
    with pytest.raises(ConfigError, match="sft.batch_size = 30 does not split into learner.num_workers = 4"):
        check_batch_size("sft.batch_size", 30, 4)


def test_progress_lines_and_summary_from_epoch_records():
    records = [
        {
            "stage": "reward",
            "member": 0,
            "epoch": 1,
            "epochs": 2,
            "loss/rm": 0.7,
            "rm/accuracy": 0.5,
            "updates": 3,
            "seconds": 1.0,
        },
        {
            "stage": "reward",
            "member": 0,
            "epoch": 2,
            "epochs": 2,
            "loss/rm": 0.6,
            "rm/accuracy": 0.75,
            "updates": 3,
            "seconds": 1.0,
        },
        {
            "stage": "reward",
            "member": 1,
            "epoch": 1,
            "epochs": 2,
            "loss/rm": 0.65,
            "rm/accuracy": 0.6,
            "updates": 3,
            "seconds": 1.0,
        },
    ]
    assert describe(records[1]) == "reward: member 0 epoch 2/2 loss/rm 0.6000 rm/accuracy 0.7500 (3 updates, 1.0 s)"
    assert last_epoch(records, {"loss/rm": "rm/loss"}) == {"rm/loss": 0.6}
    assert last_epoch(records, {"loss/rm": "rm/loss"}, member=1) == {"rm/loss": 0.65}
    assert last_epoch(records, {"loss/rm": "rm/loss"}, member=2) == {}
    assert math.isclose(last_epoch(records, {"rm/accuracy": "a"})["a"], 0.75)


def test_bad_preference_rows_stop_the_reward_stage_before_training(task_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.errors import DataError
    from pipeline.stages import Artifacts, StageContext, reward

    path = tmp_path / "prefs.parquet"
    rows = [{"prompt": "veli ka bamo ?", "chosen": " ka bamo selu .", "rejected": " lo ."}] * 3
    pq.write_table(pa.Table.from_pylist([*rows, {"prompt": "sono ?", "chosen": None, "rejected": " ka ."}]), path)
    cfg = load_config(None, [f"data.preferences={path}", f"model.policy={task_dir / 'models/policy'}"])
    ctx = StageContext(cfg=cfg, run_dir=tmp_path, artifacts=Artifacts(), log=lambda _: None)
    with pytest.raises(DataError, match=r"prefs.parquet: row 3: chosen is null"):
        reward.run(ctx)


def test_discriminator_pair_loss_is_the_per_class_mean_on_interleaved_pairs():
    # Pairs interleave (demonstration, policy sample): with one of each per pair, the discriminator's mean over the
    # two classes equals the mean over pairs of 0.5 * (-log sigmoid(s_demo) - log sigmoid(-s_sample)).
    demo, sample = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, -3.0])
    loss, metrics = PAIR_LOSSES["discriminator"](demo, sample)
    by_pair = 0.5 * (-torch.nn.functional.logsigmoid(demo) - torch.nn.functional.logsigmoid(-sample))
    assert loss.item() == pytest.approx(by_pair.mean().item())
    assert metrics["disc/accuracy"] == pytest.approx(0.5 * (2 / 3 + 1 / 3))
    bt, _ = PAIR_LOSSES["bt"](demo, sample)  # Bradley-Terry only sees differences: log(1 + e^-2), ...
    assert bt.item() == pytest.approx(sum(math.log1p(math.exp(-d)) for d in (2.0, -2.0, 3.5)) / 3)
