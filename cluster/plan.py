"""The resource plan: which bundles each role gets, and spawning actors into them through placement groups.

`plan(cfg)` is a pure function of the config (no Ray calls), so it can be printed, tested and reused by Ray Tune
(a trial reserves exactly the plan's bundles). `spawn(...)` is the one place where plain classes become Ray actors.

One placement group per role: learners are packed together (one DP group talks all-reduce every step), rollout
engines get one bundle each (tensor parallel inside the bundle on GPU), and roles may require custom node
resources (e.g. rollout engines on inference nodes) from `placement.resources`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("rollout", "reward", "reference", "learner", "critic")


@dataclass(frozen=True)
class RolePlan:
    role: str
    bundles: list[dict[str, float]]  # one bundle per actor
    strategy: str  # placement-group strategy: PACK, SPREAD, STRICT_PACK

    @property
    def count(self) -> int:
        return len(self.bundles)


@dataclass(frozen=True)
class ResourcePlan:
    device: str  # "cpu" or "gpu"
    roles: dict[str, RolePlan] = field(default_factory=dict)

    def bundles(self) -> list[dict[str, float]]:
        """Every bundle of every role, in ROLES order (what a Ray Tune trial must reserve)."""
        return [b for role in ROLES if role in self.roles for b in self.roles[role].bundles]

    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for bundle in self.bundles():
            for key, amount in bundle.items():
                out[key] = out.get(key, 0.0) + amount
        return out

    def describe(self) -> str:
        lines = [f"resource plan ({self.device}):"]
        for role in ROLES:
            if role in self.roles:
                rp = self.roles[role]
                lines.append(f"  {role:<9} x{rp.count}  {rp.bundles[0]}  {rp.strategy}")
        return "\n".join(lines)


def plan(cfg: Any, *, device: str = "cpu") -> ResourcePlan:
    """Config -> resource plan. `cfg` is a pipeline.config.Config; `device` is "cpu" or "gpu"."""
    gpu = device == "gpu"
    extra = dict(getattr(getattr(cfg, "placement", None), "resources", {}) or {})

    def bundle(role: str, gpus: float) -> dict[str, float]:
        b = {"CPU": 1.0, **({"GPU": gpus} if gpu and gpus else {})}
        b.update(extra.get(role, {}))
        return b

    tp = getattr(cfg.rollout, "tensor_parallel_size", 1)
    roles = {
        "rollout": RolePlan("rollout", [bundle("rollout", tp)] * cfg.rollout.num_workers, "PACK"),
        "reward": RolePlan("reward", [bundle("reward", 1)] * cfg.reward.num_workers, "PACK"),
        "reference": RolePlan("reference", [bundle("reference", 1)] * cfg.reference.num_workers, "PACK"),
        "learner": RolePlan("learner", [bundle("learner", 1)] * cfg.learner.num_workers, "PACK"),
    }
    if cfg.algo.name == "ppo":
        roles["critic"] = RolePlan("critic", [bundle("critic", 1)] * cfg.learner.num_workers, "PACK")
    return ResourcePlan(device=device, roles=roles)


def reserve(role_plan: RolePlan, *, timeout_s: float = 120.0):
    """Create and wait for the role's placement group; a clear error names the missing resources."""
    import ray
    from ray.util.placement_group import placement_group

    pg = placement_group(role_plan.bundles, strategy=role_plan.strategy, name=f"raylign-{role_plan.role}")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(pg)
        raise RuntimeError(
            f"could not place {role_plan.count} {role_plan.role} actor(s) with bundles {role_plan.bundles} "
            f"within {timeout_s:.0f} s; the cluster has {ray.available_resources()}"
        ) from None
    return pg


def spawn(cls: type, role_plan: RolePlan, pg, args_per_actor: list[tuple], kwargs: dict | None = None) -> list:
    """Make `cls` a Ray actor and start one per bundle of `pg`, actor i in bundle i."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if len(args_per_actor) != role_plan.count:
        raise ValueError(f"{role_plan.role}: {len(args_per_actor)} argument sets for {role_plan.count} bundles")
    actors = []
    for i, (args, bundle) in enumerate(zip(args_per_actor, role_plan.bundles, strict=True)):
        remote_cls = ray.remote(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0))(cls)
        strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)
        actors.append(remote_cls.options(scheduling_strategy=strategy).remote(*args, **(kwargs or {})))
    return actors
