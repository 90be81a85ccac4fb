"""The one recorder of the RL loop's events: the metrics.jsonl rows it writes (the public contract), TensorBoard and
the progress line, what a restart or a resume drops, and the summary.json entries, on hand-made events (no Ray)."""

import io
import json

import pytest

from pipeline.recorder import Recorder, read_events, rl_summary, truncate
from pipeline.types import EvalRow, Restart, StepRow


def step(s: int, restarts: float = 0.0) -> StepRow:
    return StepRow(
        s,
        {
            "reward/mean": 0.1 * s,
            "gold_reward/mean": 0.2 + 0.01 * s,
            "kl/ref": 0.001 * s,
            "samples": 64,
            "tokens": 640,
            "timing/step": 2.0,
            "timing/gen": 1.0,
            "timing/train": 0.5,
            "mismatch/logprob_abs_max": 1e-4 * s,
            "faults/restarts": restarts,
        },
    )


def evaluation(s: int, gold: float, final: bool = False) -> EvalRow:
    return EvalRow(s, {"eval/reward": 2 * gold, "eval/prompts": 16.0, "eval/gold_reward": gold}, final=final)


def recorder(tmp_path, total_steps=4, **kw) -> Recorder:
    return Recorder(tmp_path, stage="rl", total_steps=total_steps, out=io.StringIO(), **kw)


def lines(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def numbers(tmp_path) -> list[tuple[int, bool]]:
    """(step, is an evaluation) of every row."""
    return [(r["step"], "eval/prompts" in r) for r in lines(tmp_path)]


def test_rows_are_written_as_the_jsonl_contract_with_tensorboard_and_a_progress_line(tmp_path):
    out = io.StringIO()
    rec = Recorder(tmp_path, stage="rl", total_steps=2, out=out)
    for event in (evaluation(0, 0.3), step(1), step(2), evaluation(2, 0.5, final=True)):
        rec.add(event)
    rec.close()
    rows = lines(tmp_path)
    # key order too: stage, step, [final], then the metrics as the loop gave them
    assert list(rows[0]) == ["stage", "step", "eval/reward", "eval/prompts", "eval/gold_reward"]
    assert rows[0] == {"stage": "rl", "step": 0, "eval/reward": 0.6, "eval/prompts": 16.0, "eval/gold_reward": 0.3}
    assert list(rows[1]) == ["stage", "step", *step(1).metrics]
    assert rows[1] == {"stage": "rl", "step": 1, **step(1).metrics}
    assert list(rows[3]) == ["stage", "step", "final", "eval/reward", "eval/prompts", "eval/gold_reward"]
    assert rows[3]["final"] is True and rows[3]["step"] == 2
    assert rec.finished
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    printed = out.getvalue().splitlines()
    assert printed[0] == "[rl] step 0/2  eval  reward +0.6000  gold_reward +0.3000"
    assert printed[2].startswith("[rl] step 2/2  eta ")
    assert printed[2].endswith("reward +0.2000  gold +0.2200  kl +0.0020")


def test_events_read_back_are_the_events_recorded(tmp_path):
    rec = recorder(tmp_path)
    recorded = [evaluation(0, 0.3), step(1), step(2), evaluation(2, 0.5, final=True)]
    for event in recorded:
        rec.add(event)
    assert rec.events() == recorded


def test_a_restart_drops_the_steps_after_its_checkpoint_and_they_come_again(tmp_path):
    rec = recorder(tmp_path)
    for event in (evaluation(0, 0.3), step(1), step(2), step(3)):
        rec.add(event)
    rec.add(Restart(2, 1))  # the checkpoint of step 2: step 3 comes again
    assert numbers(tmp_path) == [(0, True), (1, False), (2, False)]
    for event in (step(3), step(4), evaluation(4, 0.5, final=True)):
        rec.add(event)
    assert numbers(tmp_path) == [(0, True), (1, False), (2, False), (3, False), (4, False), (4, True)]
    assert rec.restarts == 1 and rec.summary()["faults/learner_restarts"] == 1


def test_a_restart_without_a_checkpoint_drops_the_evaluation_before_step_1_too(tmp_path):
    # from step 0 the loop evaluates its start again: keeping the old row would count it twice
    rec = recorder(tmp_path)
    for event in (evaluation(0, 0.3), step(1)):
        rec.add(event)
    rec.add(Restart(0, 1))
    assert lines(tmp_path) == []
    rec.add(evaluation(0, 0.3))
    assert numbers(tmp_path) == [(0, True)]


def test_a_resume_from_the_last_checkpoint_drops_the_final_evaluation_it_yields_again(tmp_path):
    rec = recorder(tmp_path, total_steps=2)
    for event in (evaluation(0, 0.3), step(1), step(2), evaluation(2, 0.5, final=True)):
        rec.add(event)
    recorder(tmp_path, total_steps=2).truncate(2)  # a new process resuming from step 2's checkpoint
    assert numbers(tmp_path) == [(0, True), (1, False), (2, False)]


def test_truncation_keeps_other_stages_and_earlier_irl_rounds(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"stage": "sft", "step": 9, "loss": 1.0}) + "\n")
    first = Recorder(tmp_path, stage="irl", total_steps=4, offset=0, tags={"irl/round": 1}, out=io.StringIO())
    for event in (evaluation(0, 0.3), step(1), step(2), evaluation(2, 0.4, final=True)):
        first.add(event)
    second = Recorder(tmp_path, stage="irl", total_steps=4, offset=2, tags={"irl/round": 2}, out=io.StringIO())
    second.truncate(-1)  # round 2 starts without a checkpoint, as irl's rl_round does: round 1's rows stay
    assert len(lines(tmp_path)) == 5
    for event in (evaluation(0, 0.4), step(1)):
        second.add(event)
    # round 2's rows are numbered from 2 and tagged; its evaluation before step 1 shares step 2 with round 1's last
    assert [(r["step"], r.get("irl/round")) for r in lines(tmp_path)] == [
        (9, None),
        (0, 1),
        (1, 1),
        (2, 1),
        (2, 1),
        (2, 2),
        (3, 2),
    ]
    assert second.events() == [evaluation(0, 0.4), step(1)]  # in the loop's numbering, tags left out
    second.add(Restart(0, 1))  # round 2 starts again: only its own rows go
    assert [(r["stage"], r["step"], r.get("irl/round")) for r in lines(tmp_path)] == [
        ("sft", 9, None),
        ("irl", 0, 1),
        ("irl", 1, 1),
        ("irl", 2, 1),
        ("irl", 2, 1),
    ]
    assert [e.step for e in read_events(tmp_path, "irl")] == [0, 1, 2, 2]
    truncate(tmp_path, stage="irl", after_step=0)  # a stage-wide fresh start
    assert [r["stage"] for r in lines(tmp_path)] == ["sft"]


# Four steps of 64 samples, 640 tokens and 2 s each; evaluations with gold 0.3 before and 0.5 after.
SUMMARY = {
    "steps": 4,
    "samples_per_s": 4 * 64 / (4 * 2.0),  # 32
    "tokens_per_s": 4 * 640 / (4 * 2.0),  # 320
    "reward/initial": 0.1,
    "reward/final": 0.4,
    "kl/final": 0.004,
    "mismatch/logprob_abs_max": 4e-4,
    "gold_reward/initial": 0.3,  # the held-out evaluations', not the steps' 0.21 and 0.24
    "gold_reward/final": 0.5,
    "timing/gen": 4 * 1.0,
    "timing/train": 4 * 0.5,
    "faults/restarts": 1.0,  # the most the steps counted
    "faults/learner_restarts": 1,
}


def test_the_summary_has_todays_keys_and_hand_computed_values(tmp_path):
    rec = recorder(tmp_path)
    for event in (
        evaluation(0, 0.3),
        step(1),
        step(2),
        Restart(2, 1),
        step(3, restarts=1.0),
        step(4, 1.0),
        evaluation(4, 0.5, final=True),
    ):
        rec.add(event)
    summary = rec.summary()
    # the `rl` stage's summary.json keys (DESIGN.md) besides timing/rl, which the stage adds
    assert set(summary) == {
        "steps",
        "samples_per_s",
        "tokens_per_s",
        "reward/initial",
        "reward/final",
        "kl/final",
        "mismatch/logprob_abs_max",
        "gold_reward/initial",
        "gold_reward/final",
        "timing/gen",
        "timing/train",
        "faults/restarts",
        "faults/learner_restarts",
    }
    assert summary == pytest.approx(SUMMARY)


def test_an_unfinished_loop_takes_the_final_gold_from_its_last_step():
    summary = rl_summary([evaluation(0, 0.3), step(1), step(2)], restarts=0)
    assert summary["gold_reward/initial"] == 0.3
    assert summary["gold_reward/final"] == pytest.approx(0.22)  # step 2's samples: 0.2 + 0.01 * 2


def test_a_loop_stopped_before_step_1_summarizes_its_start_only():
    assert rl_summary([evaluation(0, 0.3)], restarts=0) == {"gold_reward/initial": 0.3, "faults/learner_restarts": 0}
    assert rl_summary([], restarts=0) == {"faults/learner_restarts": 0}


def test_without_a_gold_reward_the_summary_has_no_gold_keys():
    plain = [
        StepRow(s.step, {k: v for k, v in s.metrics.items() if k != "gold_reward/mean"}) for s in (step(1), step(2))
    ]
    no_gold = EvalRow(2, {"eval/reward": 0.1, "eval/prompts": 16.0}, final=True)
    summary = rl_summary([EvalRow(0, {"eval/reward": 0.0, "eval/prompts": 16.0}), *plain, no_gold], restarts=0)
    assert not any(k.startswith("gold_reward/") for k in summary)
