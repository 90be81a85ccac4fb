"""The offline stages (sft, reward, dpo) end to end on a local Ray: Ray Train workers with DeepSpeed ZeRO-2 engines
on CPU, data from Ray Data shards, checkpoints reported every epoch.

One pipeline run `[synth, sft, reward]` on the default synthetic task (512 prompts) backs the learning claims; DPO
then runs as a stage on top of it. The user-data and fault-tolerance tests use the small `task_dir` task.
Thresholds are set against what chance or the untrained model gives, with the measured values in comments.
"""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from pipeline.config import load_config
from pipeline.run import new_run_dir, run
from pipeline.stages import Artifacts, StageContext
from pipeline.tasks.language import gold_reward, sample_prompt, sample_response

pytestmark = pytest.mark.slow

MARKER = " zork ."  # not a word of the synthetic language: a sentence that breaks its grammar


@pytest.fixture(scope="module")
def pipeline_run(local_ray, tmp_path_factory):
    """`[synth, sft, reward]` with every default but the output dir: ~85 s on 2 cores."""
    cfg = load_config(None, ["stages=[synth, sft, reward]", f"run.output_dir={tmp_path_factory.mktemp('runs')}"])
    lines = []
    run_dir = run(cfg, log=lines.append)
    return run_dir, json.loads((run_dir / "summary.json").read_text()), lines


def test_sft_leaves_a_policy_with_room_for_rl(pipeline_run):
    run_dir, summary, lines = pipeline_run
    artifacts = Artifacts.load(run_dir)
    task = json.loads((run_dir / "task/task.json").read_text())
    # The random-init policy samples word salad: gold 0.000 over 256 samples. Default SFT measured 0.469; the
    # demonstrations themselves score ~0.98, so RL has room above.
    assert 0.2 < summary["sft/gold_reward"] < task["demo_gold_mean"] - 0.2
    assert artifacts.initial_policy == str(run_dir / "task/models/policy")
    assert artifacts.policy == str(run_dir / "stages/sft/policy")
    AutoModelForCausalLM.from_pretrained(artifacts.policy)
    AutoTokenizer.from_pretrained(artifacts.policy)
    epochs = [json.loads(x) for x in (run_dir / "stages/sft/epochs.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert all(a["loss/sft"] > b["loss/sft"] for a, b in zip(epochs, epochs[1:], strict=False))
    assert epochs[0]["rows"] == task["rows"]["demos"] - task["rows"]["test_prompts"] * 2  # the train split only
    assert len(list((run_dir / "stages/sft/train").glob("checkpoint_*/offline_state.json"))) == 2  # checkpoint.keep
    assert any(line.startswith("sft: epoch 4/4 loss/sft") for line in lines)


def test_reward_model_beats_chance_on_held_out_pairs(pipeline_run):
    run_dir, summary, _ = pipeline_run
    # 256 test pairs: chance is 0.5 (std 0.03). Measured 0.645 with the defaults (Bayes-optimal 0.899).
    assert summary["rm/heldout_accuracy"] > 0.6
    assert summary["task/bayes_optimal_accuracy"] == pytest.approx(0.8986, abs=1e-3)
    (member,) = Artifacts.load(run_dir).reward
    model = AutoModelForSequenceClassification.from_pretrained(member)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    assert (run_dir / "models/reward/config.json").exists()  # exported by the run


@pytest.mark.xfail(strict=True, reason="0.645 measured; 0.9 x Bayes = 0.809 is not reached on the default task")
def test_reward_model_reaches_ninety_percent_of_bayes_optimal(pipeline_run):
    _, summary, _ = pipeline_run
    assert summary["rm/heldout_accuracy"] >= 0.9 * summary["task/bayes_optimal_accuracy"]


@pytest.fixture(scope="module")
def dpo_summary(pipeline_run):
    """The dpo stage with the defaults, on the SFT policy of the pipeline run: ~40 s."""
    from pipeline.stages import dpo

    run_dir, _, _ = pipeline_run
    cfg = load_config(run_dir / "config.yaml", ["stages=[dpo]"])
    ctx = StageContext(cfg=cfg, run_dir=run_dir, artifacts=Artifacts.load(run_dir), log=lambda _: None)
    sft_policy = ctx.artifacts.policy
    return dpo.run(ctx), ctx.artifacts, sft_policy


def test_dpo_learns_the_preferences_against_its_reference(dpo_summary):
    summary, artifacts, sft_policy = dpo_summary
    # The implicit reward log pi/pi_ref is 0 for every response before training, so its held-out accuracy is
    # 0.5 (all ties). Measured 0.746 on 256 held-out pairs.
    assert summary["dpo/heldout_reward_accuracy"] > 0.65
    assert summary["dpo/loss"] < 0.69  # log 2 at the start
    assert artifacts.initial_policy == sft_policy and artifacts.policy.endswith("stages/dpo/policy")
    # Reported, not asserted: on this task DPO lowers the gold of samples (measured win rate 0.42, see report).
    assert 0 <= summary["dpo/gold_win_rate"] <= 1


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

    import actors.offline as offline

    if ray.train.get_checkpoint() is None:
        report = offline.report_epoch

        def report_then_fail(*args, **kwargs):
            report(*args, **kwargs)
            raise RuntimeError("injected worker failure")

        offline.report_epoch = report_then_fail
    offline.sft_loop(config)


def test_a_failed_worker_resumes_from_the_last_epoch_checkpoint(local_ray, task_dir, tmp_path):
    from actors.offline import OfflineJob
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
