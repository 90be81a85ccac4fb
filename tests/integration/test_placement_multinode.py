"""Multi-node placement on a real 2-node Ray cluster on this machine: a head holding a `trainer` resource and a
second `ray start --address` node holding `inference`. The plan sends rollout engines to inference nodes and packs
the learners onto trainer nodes; probe actors spawned into the plan's bundles report the node they run on."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cluster.local import start_node, stop_node
from tests.conftest import REPO

pytestmark = pytest.mark.slow

PLACEMENT = [
    "placement.resources={rollout: {inference: 1}, learner: {trainer: 1}}",
    "rollout.num_workers=2",
    "learner.num_workers=2",
]


@pytest.fixture(scope="module")
def two_nodes():
    """Head (4 CPUs, trainer=4) and worker (4 CPUs, inference=2), each in its own short temp dir (Ray's socket
    paths are length-limited), with token auth; stopped by PID and temp dir, never with `ray stop`."""
    temp = Path(tempfile.mkdtemp(prefix="rlp-", dir="/tmp"))
    env = {"RAY_AUTH_TOKEN": secrets.token_hex(32)}
    nodes = []
    try:
        nodes.append(start_node(temp / "head", num_cpus=4, resources={"trainer": 4}, env=env))
        nodes.append(
            start_node(
                temp / "worker", num_cpus=4, resources={"inference": 2}, env=env, head_address=nodes[0].gcs_address
            )
        )
        yield nodes[0].gcs_address, env
    finally:
        for node in reversed(nodes):
            stop_node(node)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def report(two_nodes):
    address, env = two_nodes
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.placement_probe", address, *PLACEMENT],
        cwd=REPO,
        env={**os.environ, **env, "RAY_AUTH_MODE": "token"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def node_with(report: dict, resource: str) -> str:
    (node,) = [n for n, resources in report["nodes"].items() if resource in resources]
    return node


def test_the_cluster_has_two_nodes_with_different_resources(report):
    assert len(report["nodes"]) == 2
    assert node_with(report, "inference") != node_with(report, "trainer")


def test_rollout_engines_land_on_the_inference_node(report):
    assert report["actors"]["rollout"] == [node_with(report, "inference")] * 2
    assert set(report["bundles"]["rollout"].values()) == {node_with(report, "inference")}


def test_learners_are_packed_together_on_the_trainer_node(report):
    assert report["actors"]["learner"] == [node_with(report, "trainer")] * 2
    assert set(report["bundles"]["learner"].values()) == {node_with(report, "trainer")}


def test_roles_without_custom_resources_still_land_somewhere_planned(report):
    for role in ("reward", "reference"):
        (node,) = report["actors"][role]
        assert node in report["nodes"] and node == report["bundles"][role]["0"]


def test_a_plan_no_node_can_hold_names_the_missing_resource(report):
    error = report["impossible_plan_error"]
    assert "could not place rollout" in error and "no node has big_gpu_node" in error, error
