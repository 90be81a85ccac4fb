"""The resource plan: which bundles each role gets, and spawning actors into them through placement groups.

`plan(cfg)` is a pure function of the config (no Ray calls), so it can be printed, tested and reused by Ray Tune
(a trial reserves exactly the plan's bundles); the one thing it reads besides the config is the driver's core count,
from which it decides each role's torch threads on CPU (`cpu_threads`). `spawn(...)` is the one place where plain
classes become Ray actors, into the plan's bundles or (learner groups and one-off workers) outside any group.

One placement group per role, or per group of colocated roles (`placement.colocate`): there, actor i of each
role shares bundle i and takes an equal share of its CPU and GPU (e.g. reward and reference models on one GPU).
Learners are packed together (their DP group all-reduces every step); rollout engines get one bundle each, with
`rollout.tensor_parallel_size` GPUs; `placement.resources` adds custom node resources per role (e.g. rollout
engines on inference nodes).

Where each role goes on a multi-node cluster is stated by its `RolePlan`: the nodes it may use (those holding its
custom resources, else any) and how its group is laid out over them (`STRATEGY`). Tested on a 2-node cluster
(tests/integration/test_placement_multinode.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

ROLES = ("rollout", "reward", "reference", "learner", "critic")
# Placement group strategy per role. PACK: as few nodes as fit (learners and the critic all-reduce every step;
# reward and reference models are read by the same chunk of work); SPREAD: one engine per node while nodes last
# (rollout engines are independent, and spreading them spreads generation's memory bandwidth). Both are soft:
# Ray falls back when the preferred layout does not fit. A colocated group packs unless all its roles spread.
STRATEGY = {"rollout": "SPREAD", "reward": "PACK", "reference": "PACK", "learner": "PACK", "critic": "PACK"}
STANDARD_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


@dataclass(frozen=True)
class RolePlan:
    role: str
    group: str  # name of the placement group holding this role's bundles
    bundles: list[dict[str, float]]  # actor i goes into bundle i of its group
    share: float = 1.0  # fraction of each bundle's CPU/GPU one actor takes (< 1 when colocated)
    strategy: str = "PACK"  # placement group strategy of its group (STRATEGY)
    threads: int | None = None  # torch threads of each actor on CPU (`cpu_threads`); None: Ray's, 1 per CPU it holds

    @property
    def count(self) -> int:
        return len(self.bundles)

    def node_resources(self) -> dict[str, float]:
        """Custom resources a node must hold for this role's actors (`placement.resources`); {} = any node."""
        return {k: v for k, v in self.bundles[0].items() if k not in STANDARD_RESOURCES} if self.bundles else {}

    def where(self) -> str:
        """Where the role's actors go, in words: which nodes, and how they are laid out over them."""
        custom = self.node_resources()
        nodes = "on nodes with " + ", ".join(f"{k}>={v:g}" for k, v in custom.items()) if custom else "on any node"
        layout = "packed onto as few nodes as fit" if self.strategy == "PACK" else "spread over nodes"
        return f"{nodes}, {layout}"

    def actor_resources(self, i: int) -> dict[str, Any]:
        """Ray actor options for actor i: its share of bundle i (custom resources are held by the bundle)."""
        bundle = self.bundles[i]
        return {"num_cpus": bundle.get("CPU", 0.0) * self.share, "num_gpus": bundle.get("GPU", 0.0) * self.share}

    def settings(self, section: Any) -> Any:
        """The role's config section as its actors get it: `cpu_threads` set to the planned count."""
        return section if self.threads is None else section.model_copy(update={"cpu_threads": self.threads})


@dataclass(frozen=True)
class ResourcePlan:
    device: str  # "cpu" or "gpu"
    roles: dict[str, RolePlan] = field(default_factory=dict)
    groups: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # placement group -> bundles

    def bundles(self) -> list[dict[str, float]]:
        """Every bundle of every placement group (what a Ray Tune trial must reserve)."""
        return [b for bundles in self.groups.values() for b in bundles]

    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for bundle in self.bundles():
            for key, amount in bundle.items():
                out[key] = out.get(key, 0.0) + amount
        return out

    def trial_bundles(self) -> list[dict[str, float]]:
        """The plan as the bundles of one placement group, for a Ray Tune trial: bundle i holds bundle i of every
        group, so actor i of each role keeps bundle index i and the roles need no offsets. Same total."""
        merged: list[dict[str, float]] = []
        for bundles in self.groups.values():
            for i, bundle in enumerate(bundles):
                if i == len(merged):
                    merged.append({})
                for key, amount in bundle.items():
                    merged[i][key] = merged[i].get(key, 0.0) + amount
        return merged

    def describe(self) -> str:
        lines = [f"resource plan ({self.device}):"]
        for role in ROLES:
            if role in self.roles:
                rp = self.roles[role]
                share = f"  share {rp.share:.2f} of group {rp.group}" if rp.share < 1 else ""
                threads = f"  {rp.threads} threads" if rp.threads is not None and self.device == "cpu" else ""
                lines.append(f"  {role:<9} x{rp.count}  {rp.bundles[0]}{share}{threads}  {rp.where()}")
        return "\n".join(lines)


def available_cores() -> int:
    """The cores this process may run on: the driver's, which the plan takes as every node's."""
    return len(os.sched_getaffinity(0))


def cpu_threads(cfg: Any, cores: int) -> dict[str, int]:
    """torch threads of each reference, learner and critic actor on CPU: the section's `cpu_threads`, or (0) the
    `cores` split among the processes that compute at the same time, at least 1 each. Rollout and reward actors
    keep Ray's count."""
    share = lambda processes: max(1, cores // processes)  # noqa: E731
    engines = cfg.rollout.num_workers
    ppo = cfg.algo.name == "ppo"
    # PPO's critic ranks train beside the policy's; in async mode the engines generate meanwhile, in sync mode
    # nothing else runs while the learners train.
    trainers = cfg.learner.num_workers * (2 if ppo else 1) + (engines if cfg.rollout.async_ else 0)
    learner = cfg.learner.cpu_threads or share(trainers)
    # With several chunks a step (or in async mode) the reference scores chunk c while the engines generate
    # chunk c+1; a sync step of one chunk is scored alone.
    overlaps = cfg.rollout.async_ or cfg.rollout.prompts_per_step > cfg.rollout.chunk_size
    reference = cfg.reference.cpu_threads or share(cfg.reference.num_workers + (engines if overlaps else 0))
    return {"reference": reference, "learner": learner, **({"critic": learner} if ppo else {})}


def offline_threads(cfg: Any, cores: int | None = None) -> int:
    """torch threads of each Ray Train worker of the offline stages (sft, reward, dpo, irl's discriminator):
    `learner.cpu_threads`, or (0) the cores split among the `learner.num_workers` workers, which train alone."""
    return cfg.learner.cpu_threads or max(1, (cores or available_cores()) // cfg.learner.num_workers)


def plan(cfg: Any, *, device: str = "cpu", reference_actors: bool = True, cores: int | None = None) -> ResourcePlan:
    """Config (pipeline.config.Config) -> resource plan for `device` "cpu" or "gpu", with each role's torch threads
    for a machine of `cores` cores (default: this process's). reference_actors=False: the RL stage of a LoRA run,
    where the learners serve the reference (their base model), leaves the role out."""
    gpu = device == "gpu"
    threads = cpu_threads(cfg, cores or available_cores())
    counts = {
        "rollout": cfg.rollout.num_workers,
        "reward": cfg.reward.num_workers,
        "reference": cfg.reference.num_workers,
        "learner": cfg.learner.num_workers,
    }
    if not reference_actors:
        del counts["reference"]
    if cfg.algo.name == "ppo":
        counts["critic"] = cfg.learner.num_workers
    gpus = {role: float(cfg.rollout.tensor_parallel_size if role == "rollout" else 1) for role in counts}

    def bundle(roles: list[str]) -> dict[str, float]:
        out = {"CPU": 1.0}
        if gpu:
            out["GPU"] = max(gpus[r] for r in roles)
        for role in roles:
            for key, amount in cfg.placement.resources.get(role, {}).items():
                out[key] = max(out.get(key, 0.0), amount)
        return out

    colocated = [[r for r in group if r in counts] for group in cfg.placement.colocate]
    grouped = {r for group in colocated for r in group}
    units = [group for group in colocated if group] + [[r] for r in counts if r not in grouped]
    roles, groups = {}, {}
    for members in units:
        name = "+".join(members)
        n = max(counts[r] for r in members)
        groups[name] = [bundle(members)] * n
        strategy = "SPREAD" if all(STRATEGY[r] == "SPREAD" for r in members) else "PACK"
        for role in members:
            roles[role] = RolePlan(
                role,
                name,
                groups[name][: counts[role]],
                share=1.0 / len(members),
                strategy=strategy,
                threads=threads.get(role),
            )
    return ResourcePlan(device=device, roles={r: roles[r] for r in ROLES if r in roles}, groups=groups)


def resolve_device(cfg: Any) -> str:
    """`placement.device`, with `auto` resolved to "gpu" when the Ray cluster has a GPU, else "cpu"."""
    import ray

    if cfg.placement.device != "auto":
        return cfg.placement.device
    return "gpu" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


_trial_group: Any = None  # set by `within_trial` in a Ray Tune trial's process


@contextmanager
def within_trial(pg: Any) -> Iterator[None]:
    """Inside, `reserve` hands out `pg` (the placement group Ray Tune reserved for the trial, laid out by
    `ResourcePlan.trial_bundles`) instead of creating groups, and `release` leaves it to Tune: Ray has no nested
    placement groups, and a second reservation would count the trial's resources twice."""
    global _trial_group
    _trial_group = pg
    try:
        yield
    finally:
        _trial_group = None


def reserve(resource_plan: ResourcePlan, *, timeout_s: float = 120.0) -> dict[str, Any]:
    """Create every placement group of the plan and wait for it; -> group name -> placement group.
    A clear error names the group, its bundles and what the cluster has free."""
    import ray
    from ray.util.placement_group import placement_group

    if _trial_group is not None:
        have, want = _trial_group.bundle_specs, resource_plan.trial_bundles()
        if [{k: v for k, v in b.items() if v} for b in have[: len(want)]] != want:
            raise RuntimeError(f"the trial's placement group has bundles {have}; this plan needs {want}")
        return dict.fromkeys(resource_plan.groups, _trial_group)
    made: dict[str, Any] = {}
    strategies = {rp.group: rp.strategy for rp in resource_plan.roles.values()}
    for name, bundles in resource_plan.groups.items():
        pg = placement_group(bundles, strategy=strategies.get(name, "PACK"), name=f"raylign-{name}")
        made[name] = pg
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            free = {k: v for k, v in ray.available_resources().items() if "_group_" not in k}
            missing = sorted(set(bundles[0]) - set(ray.cluster_resources()))
            hint = (
                f"; no node has {', '.join(missing)} (start nodes with `ray start --resources="
                f"'{{\"{missing[0]}\": N}}'`, or change placement.resources)"
                if missing
                else ""
            )
            release(made)
            raise RuntimeError(
                f"could not place {name} ({len(bundles)} bundles of {bundles[0]}) within {timeout_s:.0f} s; "
                f"the cluster has free: {', '.join(f'{k}={v:g}' for k, v in sorted(free.items()))}{hint}"
            ) from None
    return made


def release(groups: dict[str, Any]) -> None:
    import ray

    for pg in groups.values():
        if pg is not _trial_group:
            ray.util.remove_placement_group(pg)


def placement(role_plan: RolePlan, groups: dict[str, Any] | None, i: int, *, first_bundle: int = 0) -> Any:
    """Scheduling strategy of actor i of a role: bundle first_bundle + i of its placement group; without groups
    (None), "DEFAULT": anywhere its resources fit."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if groups is None:
        return "DEFAULT"
    return PlacementGroupSchedulingStrategy(
        placement_group=groups[role_plan.group], placement_group_bundle_index=first_bundle + i
    )


def spawn(
    cls: type,
    role_plan: RolePlan,
    groups: dict[str, Any] | None,
    args_per_actor: list[tuple],
    kwargs=None,
    *,
    kwargs_per_actor: list[dict[str, Any]] | None = None,
    restarts: int = 0,
    concurrency: int = 1,
    first_bundle: int = 0,
    node: str | None = None,
) -> list:
    """Make `cls` a Ray actor and start one per bundle of the role with that bundle's resources (`placement`:
    actor i in bundle first_bundle + i of its group; `groups` None: outside any placement group, actor 0 on node
    id `node` when given). Actor i gets `args_per_actor[i]`, `kwargs` and `kwargs_per_actor[i]`; `concurrency`
    calls at a time. With `restarts` > 0 Ray restarts a crashed actor in its bundle that many times and retries its
    calls in flight."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if len(args_per_actor) != role_plan.count:
        raise ValueError(f"{role_plan.role}: {len(args_per_actor)} argument sets for {role_plan.count} bundles")
    actors = []
    for i, args in enumerate(args_per_actor):
        strategy = placement(role_plan, groups, i, first_bundle=first_bundle)
        if groups is None and node is not None and i == 0:
            strategy = NodeAffinitySchedulingStrategy(node, soft=False)
        options = {
            **role_plan.actor_resources(i),
            "scheduling_strategy": strategy,
            "max_restarts": restarts,
            "max_task_retries": restarts,
            "max_concurrency": concurrency,
        }
        each = kwargs_per_actor[i] if kwargs_per_actor is not None else {}
        actors.append(ray.remote(cls).options(**options).remote(*args, **(kwargs or {}), **each))
    return actors
