import pytest

from cluster.plan import RolePlan, offline_threads, plan, spawn
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


def threads(overrides: list[str], cores: int = 8) -> dict[str, int | None]:
    """Each role's planned torch threads on a machine of `cores` cores (defaults: 1 rollout engine, 1 reward, 1
    reference and 1 learner actor; 16 prompts a step in chunks of 8)."""
    return {role: rp.threads for role, rp in plan(load_config(None, overrides), cores=cores).roles.items()}


def test_a_sync_learner_takes_the_cores_and_the_reference_shares_them_with_the_engines_between_chunks():
    # the learners train alone: 8 // 1; the reference scores chunk 1 while the engine generates chunk 2: 8 // (1 + 1)
    assert threads([]) == {"rollout": None, "reward": None, "reference": 4, "learner": 8}


def test_a_sync_step_of_one_chunk_gives_the_reference_the_cores():
    assert threads(["rollout.chunk_size=16"])["reference"] == 8  # nothing generates while it scores: 8 // 1


def test_async_learners_and_the_reference_share_the_cores_with_the_engines():
    # the next step's chunk generates while this one trains and scores: learner 8 // (1 + 1), reference 8 // (1 + 1)
    assert threads(["rollout.async=true", "rollout.chunk_size=16"]) == {
        "rollout": None,
        "reward": None,
        "reference": 4,
        "learner": 4,
    }
    two_engines = threads(["rollout.async=true", "rollout.num_workers=2", "learner.num_workers=2"], cores=12)
    assert two_engines["learner"] == 12 // (2 + 2) == 3 and two_engines["reference"] == 12 // (1 + 2) == 4


def test_ppo_critic_ranks_share_the_learners_cores():
    sync = threads(["algo.name=ppo", "learner.num_workers=2"])
    assert sync["learner"] == sync["critic"] == 8 // (2 * 2) == 2  # policy and critic ranks train at once
    async_ = threads(["algo.name=ppo", "learner.num_workers=2", "rollout.async=true"])
    assert async_["learner"] == async_["critic"] == 8 // (2 * 2 + 1) == 1  # beside the engine too


def test_planned_threads_are_never_0_and_a_set_count_wins():
    crowded = threads(
        ["algo.name=ppo", "learner.num_workers=2", "rollout.async=true", "rollout.num_workers=2"], cores=2
    )
    assert crowded["learner"] == crowded["critic"] == crowded["reference"] == 1  # 2 // 6 and 2 // 3, at least 1
    set_ = threads(["algo.name=ppo", "learner.cpu_threads=3", "reference.cpu_threads=5", "rollout.async=true"])
    assert (set_["learner"], set_["critic"], set_["reference"]) == (3, 3, 5)


def test_the_plan_counts_the_cores_this_process_may_run_on(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
    assert plan(load_config(None, ["rollout.chunk_size=16"])).roles["reference"].threads == 6


def test_actors_get_their_section_with_the_planned_threads():
    cfg = load_config(None, ["reference.micro_batch_size=3"])
    roles = plan(cfg, cores=8).roles
    reference = roles["reference"].settings(cfg.reference)
    assert reference.cpu_threads == 4 and reference.micro_batch_size == 3 and cfg.reference.cpu_threads == 0
    assert roles["learner"].settings(cfg.learner).cpu_threads == 8
    assert roles["rollout"].settings(cfg.rollout) is cfg.rollout  # engines keep Ray's count
    assert "reference x1  {'CPU': 1.0}  4 threads  on any node" in plan(cfg, cores=8).describe()
    assert "threads" not in plan(cfg, device="gpu", cores=8).describe()


def test_offline_workers_split_the_cores_among_themselves():
    # they train alone (no engines, no critic): 8 // 2 whatever the RL stage's mode
    cfg = load_config(None, ["learner.num_workers=2", "algo.name=ppo", "rollout.async=true"])
    assert offline_threads(cfg, cores=8) == 4
    assert offline_threads(load_config(None, ["learner.num_workers=4", "rollout.chunk_size=4"]), cores=2) == 1
    assert offline_threads(load_config(None, ["learner.cpu_threads=3"]), cores=8) == 3


NODE = "ab" * 28  # a node id: 28 bytes in hex


@pytest.fixture
def started(monkeypatch) -> list[tuple[dict, tuple, dict]]:
    """`ray.remote(cls)` stood in for: each actor `spawn` starts, as (its Ray options, args, kwargs)."""
    import ray

    out: list[tuple[dict, tuple, dict]] = []

    class Remote:
        def __init__(self, cls):
            self.chosen: dict = {}

        def options(self, **options):
            self.chosen = options
            return self

        def remote(self, *args, **kwargs):
            out.append((self.chosen, args, kwargs))
            return len(out) - 1

    monkeypatch.setattr(ray, "remote", Remote)
    return out


def test_spawn_puts_actor_i_in_bundle_first_bundle_plus_i(started):
    ranks = RolePlan("learner", "learner", [{"CPU": 1.0, "GPU": 0.5}] * 2)
    kwargs_per_actor = [{"rank": 0}, {"rank": 1}]
    spawn(
        object,
        ranks,
        {"learner": "pg"},
        [("cfg",)] * 2,
        {"seed": 0},
        kwargs_per_actor=kwargs_per_actor,
        first_bundle=3,
        node=NODE,
    )
    (first, args, kwargs), (second, _, kwargs_1) = started
    assert [o["scheduling_strategy"].placement_group_bundle_index for o in (first, second)] == [3, 4]
    assert first["scheduling_strategy"].placement_group == "pg"  # in its bundle, so `node` pins nothing
    assert (first["num_cpus"], first["num_gpus"], first["max_concurrency"]) == (1.0, 0.5, 1)
    assert args == ("cfg",) and kwargs == {"seed": 0, "rank": 0} and kwargs_1 == {"seed": 0, "rank": 1}


def test_spawn_without_a_group_pins_actor_0_to_its_node(started):
    ranks = RolePlan("learner", "learner", [{"CPU": 1.0}] * 2)
    spawn(object, ranks, None, [()] * 2, node=NODE, concurrency=2)
    (first, _, _), (second, _, _) = started
    assert first["scheduling_strategy"].node_id == NODE and first["scheduling_strategy"].soft is False
    assert second["scheduling_strategy"] == "DEFAULT" and second["max_concurrency"] == 2
    with pytest.raises(ValueError, match="1 argument sets for 2 bundles"):
        spawn(object, ranks, None, [()])
