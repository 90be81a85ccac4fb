import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray per test module, with a fixed CPU count, bound to 127.0.0.1."""
    import ray

    from pipeline.ray_hooks import WORKER_SETUP, worker_setup
    from pipeline.run import loopback_only

    worker_setup()  # the Ray Data poll of a raylign run (pipeline/ray_hooks.py), here and in every worker
    with loopback_only():  # a `_node_ip_address` of 127.0.0.1 alone does not keep Ray on loopback
        ray.init(
            num_cpus=8,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
            runtime_env={"worker_process_setup_hook": WORKER_SETUP},
        )
    yield ray
    ray.shutdown()


RAYLIGN = str(Path(sys.executable).parent / "raylign")


@pytest.fixture(scope="session")
def grpo_cli_run(tmp_path_factory) -> subprocess.CompletedProcess:
    """`raylign run configs/tiny_grpo.yaml` (synth, sft, 40 GRPO steps) from the command line, once per session:
    test_rl checks the run itself, test_eval continues it with an eval stage."""
    out = tmp_path_factory.mktemp("grpo_cli")
    return subprocess.run(
        [RAYLIGN, "run", "configs/tiny_grpo.yaml", f"run.output_dir={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def continue_run(base: Path, dest: Path, stages: list[str], overrides: list[str]) -> Path:
    """A copy of run dir `base` whose saved config runs `stages` with `overrides`, ready for `--resume`: the
    stages `base` finished are skipped, the others run."""
    import yaml

    from pipeline.config import load_config, to_yaml

    shutil.copytree(base, dest)
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    cfg["stages"] = stages
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg))
    (dest / "config.yaml").write_text(to_yaml(load_config(dest / "config.yaml", overrides)))
    return dest
