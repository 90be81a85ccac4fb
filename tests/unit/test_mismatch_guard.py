"""The learner-vs-rollout mismatch guard (pipeline/rl_roles.check_mismatch): it fires only on on-policy steps over
the threshold, warns in one line by default and stops the run with rollout.on_mismatch=error."""

import pytest

from pipeline.config import RolloutConfig
from pipeline.errors import RunFailure
from pipeline.rl_roles import check_mismatch


def step_metrics(mismatch: float, weight_version: int) -> dict[str, float]:
    return {"mismatch/logprob_abs_max": mismatch, "weight_version": float(weight_version), "samples": 8.0}


def test_an_on_policy_step_within_the_threshold_passes():
    assert check_mismatch(3, step_metrics(2e-6, weight_version=2), RolloutConfig()) is None


def test_a_broken_sync_warns_in_one_line_naming_the_step_and_the_value():
    # the Qwen2 tied-head bug measured 0.044 at step 3; the default threshold is 0.01
    warning = check_mismatch(3, step_metrics(0.044, weight_version=2), RolloutConfig())
    assert warning is not None and "\n" not in warning
    assert "rl step 3" in warning and "0.044" in warning and "rollout.max_logprob_mismatch=0.01" in warning


def test_on_mismatch_error_stops_the_run_naming_the_step_and_the_value():
    with pytest.raises(RunFailure, match=r"rl step 3: .*0\.044.*rollout\.on_mismatch=error"):
        check_mismatch(3, step_metrics(0.044, weight_version=2), RolloutConfig(on_mismatch="error"))


def test_the_threshold_is_the_configured_one():
    cfg = RolloutConfig(max_logprob_mismatch=0.5)
    assert check_mismatch(3, step_metrics(0.3, weight_version=2), cfg) is None
    assert check_mismatch(3, step_metrics(0.6, weight_version=2), cfg) is not None


def test_stale_samples_of_async_mode_are_not_checked():
    # step 3 trains on samples of weights 1 (one update behind): they differ from the learner's by design
    assert check_mismatch(3, step_metrics(0.8, weight_version=1), RolloutConfig(on_mismatch="error")) is None


def test_a_step_without_rollout_logprobs_is_not_checked():
    assert check_mismatch(3, {"weight_version": 2.0}, RolloutConfig(on_mismatch="error")) is None
