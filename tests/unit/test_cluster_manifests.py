"""The cluster manifests agree with each other and with the config that uses them: the launcher YAML passes Ray's
own schema, every manifest turns token auth on, and the custom resources the GPU config's placement asks for are
the ones the worker types provide. (Nothing here starts a cluster; tests/integration/test_jobs.py does, locally.)"""

import json
import re
from pathlib import Path

import yaml

from pipeline.config import load_config
from tests.conftest import REPO

CLUSTER = REPO / "cluster"


def placement_resources() -> set[str]:
    cfg = load_config(REPO / "configs/gpu_grpo_2node.yaml")
    return {key for resources in cfg.placement.resources.values() for key in resources}


def test_launcher_yaml_passes_rays_schema_and_provides_the_configs_resources():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does first (prepare_config adds the AWS defaults)
    types = config["available_node_types"]
    provided = {key for t in types.values() for key in t.get("resources", {})}
    assert placement_resources() <= provided
    assert types[config["head_node_type"]]["resources"] == {"GPU": 0}  # the head holds no GPU work
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token ray start" in command
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][1]
    assert "~/.ray/auth_token" in config["file_mounts"]


def kuberay_cluster_specs():
    cluster = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    return [cluster["spec"], job["spec"]["rayClusterSpec"]]


def test_kuberay_manifests_use_token_auth_and_provide_the_configs_resources():
    for spec in kuberay_cluster_specs():
        assert spec["authOptions"] == {"mode": "token", "secretName": "raylign-ray-token"}
        assert spec["rayVersion"] == "2.60.0"
        provided = set()
        for group in spec["workerGroupSpecs"]:
            # KubeRay passes rayStartParams through as strings: the resources value is a quoted JSON object.
            provided |= set(json.loads(json.loads(group["rayStartParams"]["resources"])))
            (container,) = group["template"]["spec"]["containers"]
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) > 0
        assert placement_resources() <= provided


def test_rayjob_runs_a_config_the_image_holds():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())["spec"]
    config = re.fullmatch(r"raylign run /home/ray/raylign/(\S+)", job["entrypoint"]).group(1)
    assert (REPO / config).is_file()
    assert "COPY --chown=ray:users configs ./configs" in (CLUSTER / "Dockerfile").read_text()
    assert "RAY_JOB_STOP_SIGNAL: SIGINT" in job["runtimeEnvYAML"]


def test_the_image_copies_every_package_of_the_project():
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = re.search(r"include = \[(.*?)\]", pyproject).group(1)
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    for package in re.findall(r'"(\w+)\*"', packages):
        assert f"COPY --chown=ray:users {package} ./{package}" in dockerfile, package
    assert Path(REPO / ".dockerignore").read_text().splitlines()[0] == ".venv"
