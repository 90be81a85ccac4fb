import pytest

from cluster.plan import plan
from pipeline.config import load_config
from pipeline.errors import ConfigError


def test_cpu_plan_gives_each_actor_one_cpu_bundle():
    cfg = load_config(None, ["rollout.num_workers=2", "learner.num_workers=2"])
    p = plan(cfg)
    assert p.roles["rollout"].bundles == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert p.roles["learner"].count == 2 and "critic" not in p.roles
    assert p.total() == {"CPU": 6.0}  # 2 rollout + 1 reward + 1 reference + 2 learners
    assert set(p.groups) == {"rollout", "reward", "reference", "learner"}


def test_gpu_plan_with_ppo_critic_and_tensor_parallel_rollout():
    cfg = load_config(None, ["algo.name=ppo", "learner.num_workers=2", "rollout.tensor_parallel_size=2"])
    p = plan(cfg, device="gpu")
    assert p.roles["critic"].count == 2
    assert p.roles["rollout"].bundles == [{"CPU": 1.0, "GPU": 2.0}]
    assert p.roles["learner"].bundles[0] == {"CPU": 1.0, "GPU": 1.0}
    assert p.total()["GPU"] == 2 + 1 + 1 + 2 + 2
    assert "critic" in p.describe()


def test_colocated_roles_share_bundles():
    cfg = load_config(None, ["placement.colocate=[[reward, reference]]", "reward.num_workers=2"])
    p = plan(cfg, device="gpu")
    reward, reference = p.roles["reward"], p.roles["reference"]
    assert reward.group == reference.group == "reward+reference"
    assert p.groups["reward+reference"] == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert reward.count == 2 and reference.count == 1
    assert reward.actor_resources(0) == {"num_cpus": 0.5, "num_gpus": 0.5}
    assert p.total()["GPU"] == 1 + 2 + 1  # rollout, the shared pair of bundles, learner


def test_custom_resources_pin_roles_to_nodes():
    cfg = load_config(None, ["placement.resources={rollout: {inference_node: 1}}"])
    p = plan(cfg)
    assert p.roles["rollout"].bundles == [{"CPU": 1.0, "inference_node": 1.0}]
    assert p.roles["learner"].bundles == [{"CPU": 1.0}]


@pytest.mark.parametrize(
    "value, message",
    [
        ("[[reward, reward]]", "appears in two groups"),
        ("[[reward]]", "at least 2 roles"),
        ("[[reward, bogus]]", "placement.colocate[0][1]"),
    ],
)
def test_bad_colocation_is_a_config_error(value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [f"placement.colocate={value}"])
