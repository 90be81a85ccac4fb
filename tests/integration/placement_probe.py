"""Driver for the 2-node placement test, run as `python -m tests.integration.placement_probe GCS_ADDRESS key=value ...`
in its own process (its own Ray connection and token). Reserves the plan of the config, spawns a probe actor into
every bundle with `cluster.plan.spawn`, and prints one JSON line: each role's actor nodes, each group's bundle nodes,
the cluster's nodes with their resources, and the error of a plan no node can hold."""

import json
import sys

import ray

from cluster.plan import plan, release, reserve, spawn
from pipeline.config import load_config


class Probe:
    """Stands in for a role's actor: reports the node it runs on."""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def main(address: str, overrides: list[str]) -> None:
    ray.init(address=address, log_to_driver=False)
    resource_plan = plan(load_config(None, overrides))
    groups = reserve(resource_plan, timeout_s=60)
    actors = {role: spawn(Probe, rp, groups, [()] * rp.count) for role, rp in resource_plan.roles.items()}
    report = {
        "actors": {role: ray.get([a.node_id.remote() for a in handles]) for role, handles in actors.items()},
        "bundles": {name: ray.util.placement_group_table(pg)["bundles_to_node_id"] for name, pg in groups.items()},
        "nodes": {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]},
    }
    release(groups)
    try:
        reserve(plan(load_config(None, ["placement.resources={rollout: {big_gpu_node: 1}}"])), timeout_s=3)
    except RuntimeError as e:
        report["impossible_plan_error"] = str(e)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
