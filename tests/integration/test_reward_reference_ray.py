"""RewardWorker and ReferenceWorker as Ray actors give what the plain classes give, and errors keep their type."""

import os
import shutil
import socket

import pytest
import torch
from transformers import AutoTokenizer

from actors.reference import ReferenceWorker
from actors.reward import RemoteRewardError, RewardWorker
from pipeline.config import ReferenceConfig, RewardConfig
from pipeline.errors import ConfigError
from tests.unit.test_reference_worker import rollouts_of, sample_texts


@pytest.fixture(scope="module")
def rollouts(task_dir):
    return rollouts_of(AutoTokenizer.from_pretrained(task_dir / "models/policy"), *sample_texts(10, seed=5))


def spawn(ray, cls, *args):
    actor = ray.remote(num_cpus=1)(cls).remote(*args)
    ray.get(actor.setup.remote())
    return actor


def test_reward_actor_equals_plain_class(local_ray, task_dir, rollouts):
    cfg = RewardConfig(function="pipeline.tasks.synthetic:gold_reward", weights={"model": 0.5}, micro_batch_size=4)
    dirs = [task_dir / "models/reward"]
    plain = RewardWorker(cfg, dirs)
    plain.setup()
    want = plain.score(rollouts)
    actor = spawn(local_ray, RewardWorker, cfg, dirs)
    got = local_ray.get(actor.score.remote(rollouts))
    local_ray.kill(actor)
    assert set(got.parts) == {"model", "function"}
    torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.model_mean, want.model_mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.parts["function"], want.parts["function"])


def test_reference_actor_equals_plain_class(local_ray, task_dir, rollouts):
    cfg = ReferenceConfig(micro_batch_size=4)
    plain = ReferenceWorker(cfg, task_dir / "models/policy")
    plain.setup()
    want = plain.logprobs(rollouts)
    actor = spawn(local_ray, ReferenceWorker, cfg, task_dir / "models/policy")
    got = local_ray.get(actor.logprobs.remote(rollouts))
    local_ray.kill(actor)
    assert got.shape == rollouts.response_ids.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_errors_cross_the_actor_boundary_with_their_type(local_ray):
    with socket.socket() as s:  # a port nothing listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    actor = spawn(local_ray, RewardWorker, RewardConfig(url=url, timeout_s=0.3, max_retries=1, backoff_s=0.01), [])
    with pytest.raises(RemoteRewardError) as info:
        local_ray.get(actor.score_texts.remote(["veli ka bamo ?"], [" ka tiru ."]))
    assert url in str(info.value) and "2 attempt" in str(info.value)
    local_ray.kill(actor)
    with pytest.raises(ConfigError, match="reward.function"):
        spawn(local_ray, RewardWorker, RewardConfig(function="no_such_module_xyz:f"), [])


def test_score_pairs_in_parts_equals_one_plain_scoring(local_ray, task_dir, monkeypatch, tmp_path):
    """The held-out pair scoring of the reward and eval stages: an actor that takes the pairs in parts (here 5
    pairs a part, the last one short) gives the scores of one in-process scoring, in the pairs' order."""
    from actors.reward import ModelScorer
    from pipeline.stages import heldout

    monkeypatch.setattr(heldout, "PAIRS_PER_CALL", 5)
    prompts, chosen = sample_texts(23, seed=3)
    _, rejected = sample_texts(23, seed=4)
    from pipeline.tasks.tiny_models import build_reward_model

    second = tmp_path / "member-1"  # another random-init reward model: the members' rows must not swap
    tokenizer = AutoTokenizer.from_pretrained(task_dir / "models/reward")
    build_reward_model(tokenizer, hidden_size=64, layers=1, seed=5).save_pretrained(second)
    tokenizer.save_pretrained(second)
    cfg, dirs = RewardConfig(micro_batch_size=4), [str(task_dir / "models/reward"), str(second)]
    got_chosen, got_rejected = heldout.score_pairs(print, "scoring", dirs, cfg, prompts, chosen, rejected)
    plain = ModelScorer.from_config(cfg, dirs)
    assert got_chosen.shape == got_rejected.shape == (2, 23)
    torch.testing.assert_close(got_chosen, plain.score(prompts, chosen), atol=1e-5, rtol=0)
    torch.testing.assert_close(got_rejected, plain.score(prompts, rejected), atol=1e-5, rtol=0)


def test_score_pairs_reads_back_its_kept_scores_of_the_same_models_only(local_ray, task_dir, tmp_path):
    """What eval's calibration relies on: scores kept by one call come back from the file for the same model files
    and pairs, and are scored afresh once a model's weights change."""
    from pipeline.stages import heldout

    member = tmp_path / "member-0"
    shutil.copytree(task_dir / "models/reward", member)
    prompts, chosen = sample_texts(6, seed=3)
    _, rejected = sample_texts(6, seed=4)
    cfg, kept, lines = RewardConfig(micro_batch_size=4), tmp_path / "heldout_scores.pt", []
    first = heldout.score_pairs(lines.append, "scoring", [str(member)], cfg, prompts, chosen, rejected, keep=kept)
    again = heldout.score_pairs(lines.append, "scoring", [str(member)], cfg, prompts, chosen, rejected, reuse=kept)
    assert lines[-1].endswith("(same models and pairs)")
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    (weights,) = member.glob("*.safetensors")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a retrained member
    seen = len(lines)
    heldout.score_pairs(lines.append, "scoring", [str(member)], cfg, prompts, chosen, rejected, reuse=kept)
    assert lines[seen] == "scoring: 6 pairs, 1 model(s)"
