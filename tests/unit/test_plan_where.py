"""The resource plan states where each role goes: the nodes it may use and how its group is laid out."""

from cluster.plan import plan
from pipeline.config import load_config


def test_custom_resources_choose_the_nodes_and_roles_choose_the_layout():
    cfg = load_config(
        None,
        [
            "placement.resources={rollout: {inference: 1}, learner: {trainer: 1}}",
            "rollout.num_workers=2",
            "learner.num_workers=2",
            "algo.name=ppo",
        ],
    )
    roles = plan(cfg).roles
    assert roles["rollout"].node_resources() == {"inference": 1.0}
    assert roles["rollout"].where() == "on nodes with inference>=1, spread over nodes"
    assert roles["learner"].where() == "on nodes with trainer>=1, packed onto as few nodes as fit"
    assert roles["critic"].strategy == "PACK" and roles["reward"].node_resources() == {}
    assert roles["reward"].where() == "on any node, packed onto as few nodes as fit"


def test_a_colocated_group_packs_unless_every_member_spreads():
    cfg = load_config(None, ["placement.colocate=[[rollout, reference]]"])
    roles = plan(cfg, device="gpu").roles
    assert roles["rollout"].strategy == roles["reference"].strategy == "PACK"
    assert roles["rollout"].node_resources() == {}  # GPU is not a custom resource


def test_describe_says_where_each_role_goes():
    text = plan(load_config(None, ["placement.resources={rollout: {inference: 1}}"])).describe()
    assert "rollout   x1  {'CPU': 1.0, 'inference': 1.0}  on nodes with inference>=1, spread over nodes" in text
