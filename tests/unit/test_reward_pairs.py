"""`rm.pairs` / `dpo.pairs`: rated pairs of the policy's own samples need the synthetic task's raters; a run without a
synth stage gets one error naming the setting, before any sampling."""

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.stages import Artifacts, StageContext
from pipeline.stages.offline import rated_policy_pairs
from pipeline.stages.reward import train_pairs


@pytest.mark.parametrize("pairs", ["policy", "both"])
def test_policy_pairs_without_a_synthetic_task_name_the_setting(tmp_path, pairs):
    cfg = load_config(None, [f"rm.pairs={pairs}", f"run.output_dir={tmp_path}", f"model.policy={tmp_path}"])
    ctx = StageContext(cfg=cfg, run_dir=tmp_path, artifacts=Artifacts(), log=lambda _: None)
    with pytest.raises(ConfigError, match=r"rm.pairs=policy needs the synthetic task's raters: run a `synth` stage"):
        train_pairs(ctx, tmp_path)
    with pytest.raises(ConfigError, match=r"^dpo.pairs=policy needs"):
        rated_policy_pairs(ctx, tmp_path, 4, key="dpo.pairs")


def test_rm_pairs_defaults_to_the_preferences_file_and_rejects_other_values():
    cfg = load_config(None)
    assert cfg.rm.pairs == "data" and cfg.rm.policy_pairs_per_prompt == 8
    with pytest.raises(ConfigError, match="rm.pairs"):
        load_config(None, ["rm.pairs=gold"])
