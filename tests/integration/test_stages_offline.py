"""The offline stages (sft, reward, dpo) end to end on a local Ray: Ray Train workers with DeepSpeed ZeRO-2 engines
on CPU, data from Ray Data shards, checkpoints reported every epoch.

One run of the `make run` pipeline (configs/tiny_irl.yaml: synth, sft, reward, rl, eval) backs the learning claims
of the offline stages, the rise of the gold reward under RL against the learned reward model and the eval stage's
verdict on that policy; `configs/tiny_dpo.yaml` runs as it is for DPO. The user-data and fault-tolerance tests use
the small `task_dir` task.
Thresholds are set against what chance or the untrained model gives, with the measured values in comments.
"""

import json
import math
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from pipeline.config import load_config
from pipeline.recorder import read_events
from pipeline.run import new_run_dir, run
from pipeline.stages import Artifacts, StageContext
from pipeline.tasks.language import gold_reward, sample_prompt, sample_response
from pipeline.types import StepRow
from tests.conftest import REPO

# The `make run` pipeline is one fixture, and its run counts against the first test that uses it: a whole
# `make run` may exceed the suite's 900 s per test on a 2-core machine (docs/development.md has the timings).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

MARKER = " zork ."  # not a word of the synthetic language: a sentence that breaks its grammar


@pytest.fixture(scope="module")
def pipeline_run(local_ray, tmp_path_factory):
    """`make run`'s pipeline: configs/tiny_irl.yaml as it is."""
    overrides = [f"run.output_dir={tmp_path_factory.mktemp('runs')}"]
    cfg = load_config(REPO / "configs/tiny_irl.yaml", overrides)
    lines = []
    run_dir = run(cfg, log=lines.append)
    return run_dir, json.loads((run_dir / "summary.json").read_text()), lines


def test_sft_leaves_a_policy_with_room_for_rl(pipeline_run):
    run_dir, summary, lines = pipeline_run
    task = json.loads((run_dir / "task/task.json").read_text())
    # The random-init policy samples word salad: gold 0.000 over 256 samples. Default SFT measured 0.469; the
    # demonstrations themselves score ~0.98, so RL has room above.
    assert 0.2 < summary["sft/gold_reward"] < task["demo_gold_mean"] - 0.2
    sft_policy = run_dir / "stages/sft/policy"
    AutoModelForCausalLM.from_pretrained(sft_policy)
    AutoTokenizer.from_pretrained(sft_policy)
    epochs = [json.loads(x) for x in (run_dir / "stages/sft/epochs.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert all(a["loss/sft"] > b["loss/sft"] for a, b in zip(epochs, epochs[1:], strict=False))
    assert epochs[0]["rows"] == task["rows"]["demos"] - task["rows"]["test_prompts"] * 2  # the train split only
    assert len(list((run_dir / "stages/sft/train").glob("checkpoint_*/offline_state.json"))) == 2  # checkpoint.keep
    assert any(line.startswith("sft: epoch 4/4 loss/sft") for line in lines)


def test_reward_model_learns_most_of_what_the_labels_hold(pipeline_run):
    run_dir, summary, _ = pipeline_run
    task = json.loads((run_dir / "task/task.json").read_text())
    accuracy, bayes = summary["rm/heldout_accuracy"], summary["rm/bayes_optimal_accuracy"]
    assert bayes == task["bayes_optimal_accuracy"] == summary["task/bayes_optimal_accuracy"]
    assert summary["rm/heldout_accuracy_over_bayes"] == pytest.approx(accuracy / bayes)
    # 8,192 test pairs: chance is 0.5 (standard error 0.006). Measured 0.800-0.806 with 160 file pairs per prompt
    # and a constant LR (0.903-0.910 x Bayes, four runs), against 0.645 with the 4 pairs per prompt of before; 0.7 is
    # many standard errors below both.
    assert math.sqrt(accuracy * (1 - accuracy) / task["rows"]["test_pairs"]) < 0.012
    assert accuracy > 0.7
    (member,) = Artifacts.load(run_dir).reward
    model = AutoModelForSequenceClassification.from_pretrained(member)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    assert (run_dir / "models/reward/config.json").exists()  # exported by the run


def test_reward_model_reaches_ninety_percent_of_bayes_optimal(pipeline_run):
    _, summary, _ = pipeline_run
    assert summary["rm/heldout_accuracy"] >= 0.9 * summary["rm/bayes_optimal_accuracy"]


def test_the_rl_stage_of_make_run_reports_gold_and_the_overoptimization_plot(pipeline_run):
    run_dir, summary, lines = pipeline_run
    steps = [e for e in read_events(run_dir, "rl") if isinstance(e, StepRow)]
    assert len(steps) == summary["steps"] == 20
    assert all(k in summary for k in ("gold_reward/initial", "gold_reward/final", "rm/heldout_accuracy"))
    assert (run_dir / "plots/overoptimization.png").stat().st_size > 5000
    assert [line for line in lines if line.startswith("run: stage ")] == [
        f"run: stage {name} ({i}/5)" for i, name in enumerate(["synth", "sft", "reward", "rl", "eval"], start=1)
    ]


def test_rl_against_the_learned_reward_raises_the_gold_reward(pipeline_run):
    _, summary, _ = pipeline_run
    # Held-out gold of the policy's samples (64 prompts x 4): the standard error of the difference of two such
    # means is ~0.03, so a rise of 0.05 is not noise. Measured 0.491 -> 0.580 (and 0.481 -> 0.441 when the reward
    # model saw the file's generator-made pairs alone: README).
    assert summary["gold_reward/final"] > summary["gold_reward/initial"] + 0.05


def test_the_eval_of_make_run_finds_the_policy_better_than_its_reference_on_gold(pipeline_run):
    run_dir, summary, _ = pipeline_run
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["reference"].endswith("stages/sft/policy") and report["policy"].endswith("stages/rl/policy")
    # Gold win rate of the RL policy's samples over the SFT policy's on 64 held-out prompts x 8 pairs, with its
    # 95% bootstrap interval over prompts: 0.5 means no better than the reference. Measured 0.637 [0.597, 0.678]
    # (gold 0.464 -> 0.580 at KL 1.33).
    win = report["win_rate"]["gold"]
    assert 0.5 < win["low"] < win["mean"] < win["high"]
    assert summary["eval/gold_reward"] > summary["eval/gold_reward_reference"]
    # Best-of-N from the reference with the learned reward model: more samples, more gold at first (measured 0.46,
    # 0.55, 0.61 for N = 1, 2, 4).
    gold = [row["gold"]["mean"] for row in report["best_of_n"]]
    assert gold[2] > gold[0] + 0.05
    for name in ("eval_best_of_n.png", "eval_calibration.png"):
        assert (run_dir / "plots" / name).stat().st_size > 10_000


def test_the_eval_calibration_reads_the_reward_stages_held_out_scores(pipeline_run):
    run_dir, summary, lines = pipeline_run
    (line,) = [line for line in lines if line.startswith("eval: calibration, scoring the pairs:")]
    assert line.endswith("(same models and pairs)") and "stages/reward/heldout_scores.pt" in line
    report = json.loads((run_dir / "eval.json").read_text())
    # the same scores, so the same accuracy (a margin against zero there: float rounding may split a rare tie)
    assert report["calibration"]["accuracy"]["mean"] == pytest.approx(summary["rm/heldout_accuracy"], abs=1e-3)


@pytest.fixture(scope="module")
def dpo_summary(local_ray, tmp_path_factory):
    """`raylign run configs/tiny_dpo.yaml`: synth, SFT, then DPO on pairs of the SFT policy's own samples
    (dpo.pairs=policy) labelled by the task's raters."""
    cfg = load_config(REPO / "configs/tiny_dpo.yaml", [f"run.output_dir={tmp_path_factory.mktemp('dpo')}"])
    run_dir = run(cfg, log=lambda _: None)
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary, Artifacts.load(run_dir), str(run_dir / "stages/sft/policy")


def test_dpo_raises_the_gold_win_rate_against_the_sft_policy(dpo_summary):
    summary, artifacts, sft_policy = dpo_summary
    assert summary["dpo/loss"] < 0.69  # log 2 at the start: it learned its (on-policy) pairs
    assert artifacts.initial_policy == sft_policy and artifacts.policy.endswith("stages/dpo/policy")
    # Win rate of DPO samples over SFT samples on 64 held-out prompts x 4 pairs (ties half): 0.5 for an unchanged
    # policy, standard error ~0.03. Measured 0.604 (gold 0.419 -> 0.486); 0.55 is ~1.7 standard errors above an
    # unchanged policy and below the measurement. (The same DPO from the `make run` pipeline's SFT policy, gold 0.470,
    # measured 0.426: DPO's gain depends on the policy it starts from; README.) Its implicit reward orders the task's
    # generator-made held-out pairs worse than chance, 0.386: those are not the policy's samples; reported, not
    # asserted.
    assert summary["dpo/gold_win_rate"] > 0.55
    assert summary["dpo/gold_reward"] > summary["dpo/gold_reward_initial"]


def marker_preferences(path, n_prompts: int, seed: int) -> float:
    """Pairs of synthetic responses where the chosen one carries MARKER. -> the share of pairs whose chosen
    response has the higher gold reward: the marker breaks a sentence, so the file's rule goes against gold."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_prompts):
        prompt = sample_prompt(rng)
        for _ in range(4):
            a, b = (sample_response(rng, prompt, quality=rng.random()) for _ in range(2))
            rows.append(
                {"prompt": prompt, "chosen": a + MARKER, "rejected": b, "split": "test" if i % 5 == 0 else "train"}
            )
    pq.write_table(pa.Table.from_pylist(rows), path)
    gold_chosen = gold_reward([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    gold_rejected = gold_reward([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    return sum(c > r for c, r in zip(gold_chosen, gold_rejected, strict=True)) / len(rows)


@pytest.fixture(scope="module")
def marker_runs(local_ray, task_dir, tmp_path_factory):
    """The reward stage alone on a user preferences file, with 1 and with 2 Ray Train workers: ~30 s each."""
    out = tmp_path_factory.mktemp("marker")
    gold_agreement = marker_preferences(out / "prefs.parquet", n_prompts=80, seed=5)
    summaries = {}
    for workers in (1, 2):
        overrides = [
            "stages=[reward]",
            f"run.output_dir={out}",
            f"data.preferences={out / 'prefs.parquet'}",
            f"model.policy={task_dir / 'models/policy'}",
            f"learner.num_workers={workers}",
            "rm.epochs=3",  # measured with 3 epochs (the default became 2 with 8x the synthetic pairs)
        ]
        run_dir = run(load_config(None, overrides), log=lambda _: None)
        epochs = [json.loads(x) for x in (run_dir / "stages/reward/epochs.jsonl").read_text().splitlines()]
        summaries[workers] = json.loads((run_dir / "summary.json").read_text()), epochs
    return gold_agreement, summaries


def test_reward_stage_learns_the_rule_of_user_preferences(marker_runs):
    gold_agreement, summaries = marker_runs
    assert gold_agreement < 0.5  # the synthetic gold does not explain these labels (measured 0.45)
    summary, _ = summaries[1]
    assert summary["rm/heldout_accuracy"] > 0.9  # on 64 pairs of held-out prompts; chance 0.5
    assert "task/bayes_optimal_accuracy" not in summary  # no synthetic task in this run


def test_two_workers_match_one(marker_runs):
    _, summaries = marker_runs
    (one, one_epochs), (two, two_epochs) = summaries[1], summaries[2]
    # the same global batch: the same number of updates over all the train rows, whatever the worker count
    assert [(r["updates"], r["rows"]) for r in one_epochs] == [(r["updates"], r["rows"]) for r in two_epochs]
    assert abs(one["rm/heldout_accuracy"] - two["rm/heldout_accuracy"]) <= 0.05
    assert two["rm/heldout_accuracy"] > 0.9


def flaky_sft_loop(config):
    """sft_loop whose first attempt dies right after reporting its first epoch checkpoint."""
    import ray.train

    import actors.training.offline as offline

    if ray.train.get_checkpoint() is None:
        report = offline.report_epoch

        def report_then_fail(*args, **kwargs):
            report(*args, **kwargs)
            raise RuntimeError("injected worker failure")

        offline.report_epoch = report_then_fail
    offline.sft_loop(config)


def test_a_failed_worker_resumes_from_the_last_epoch_checkpoint(local_ray, task_dir, tmp_path):
    from actors.training.offline import OfflineJob
    from pipeline.stages.offline import fit, train_dataset

    policy = task_dir / "models/policy"
    cfg = load_config(None, [f"run.output_dir={tmp_path}", f"model.policy={policy}"])
    ctx = StageContext(cfg=cfg, run_dir=new_run_dir(cfg), artifacts=Artifacts(task_dir=str(task_dir)), log=print)
    out = ctx.stage_dir("sft") / "policy"
    job = OfflineJob("sft", cfg.learner.model_copy(update={"epochs": 2}), str(policy), str(policy), str(out), 32, 0)
    records = fit(ctx, "sft", flaky_sft_loop, job, {"train": train_dataset(ctx, "demos", policy)}, max_failures=1)
    # The first attempt died inside epoch 1's report, after its checkpoint was stored (so its progress record was
    # never sent); the restarted workers loaded that checkpoint (weights, optimizer state, step count) and trained
    # epoch 2 only.
    (record,) = records
    assert record["epoch"] == 2 and record["step"] == 2 * record["updates"]
    assert len(list((ctx.stage_dir("sft") / "train").glob("checkpoint_*/offline_state.json"))) == 2
    AutoModelForCausalLM.from_pretrained(out)
