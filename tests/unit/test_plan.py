from cluster.plan import plan
from pipeline.config import load_config


def test_cpu_plan_gives_each_actor_one_cpu_bundle():
    cfg = load_config(None, ["rollout.num_workers=2", "learner.num_workers=2"])
    p = plan(cfg)
    assert p.roles["rollout"].bundles == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert p.roles["learner"].count == 2 and "critic" not in p.roles
    assert p.total() == {"CPU": 6.0}  # 2 rollout + 1 reward + 1 reference + 2 learners


def test_gpu_plan_and_ppo_critic():
    cfg = load_config(None, ["algo.name=ppo", "learner.num_workers=2"])
    p = plan(cfg, device="gpu")
    assert p.roles["critic"].count == 2
    assert p.roles["learner"].bundles[0] == {"CPU": 1.0, "GPU": 1.0}
    assert p.total()["GPU"] == 1 + 1 + 1 + 2 + 2
    assert "learner" in p.describe()
