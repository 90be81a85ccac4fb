"""`make lint` catches what it claims to: each of its checks, run with the repo's own configuration, fails on a
planted violation and passes on clean code; and the Makefile's lint recipe runs every one of them."""

import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO

BIN = REPO / ".venv" / "bin"

CLEAN = "def double(x: int) -> int:\n    return 2 * x\n"
# One planted violation per check: an unused import (ruff check), a line the formatter would rewrite
# (ruff format --check), and a str returned where an int is declared (mypy).
PLANTED = {
    "ruff check": "import os\n\n\n" + CLEAN,
    "ruff format --check": "def double(x: int) -> int:\n    return 2*x\n",
    "mypy": 'def double(x: int) -> int:\n    return "2" * x\n',
}


def command(check: str, path) -> list[str]:
    tool, *args = check.split()
    config = "--config-file" if tool == "mypy" else "--config"
    return [str(BIN / tool), *args, config, str(REPO / "pyproject.toml"), str(path)]


def lint(check: str, source: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "planted.py"
    path.write_text(source)
    return subprocess.run(command(check, path), cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("check", sorted(PLANTED))
def test_each_check_fails_on_its_planted_violation_and_passes_clean_code(check, tmp_path):
    planted = lint(check, PLANTED[check], tmp_path)
    assert planted.returncode != 0, planted.stdout + planted.stderr
    clean = lint(check, CLEAN, tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr


def test_the_import_rules_fail_on_a_planted_import_of_ray_in_pipeline_algo(tmp_path):
    """lint-imports with the repo's contracts, on a copy of the packages where pipeline/algo imports Ray."""
    for package in ("pipeline", "actors"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))

    def lint_imports() -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(tmp_path)}
        return subprocess.run(
            [str(BIN / "lint-imports"), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    clean = lint_imports()
    assert clean.returncode == 0, clean.stdout + clean.stderr
    (tmp_path / "pipeline/algo/planted.py").write_text("import ray\n")
    planted = lint_imports()
    assert planted.returncode != 0 and "pipeline.algo.planted" in planted.stdout, planted.stdout + planted.stderr


def test_make_lint_runs_every_check_and_ci_runs_it_before_the_suite():
    recipe = re.search(r"^lint:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M).group(1)
    for tool in ("ruff check", "ruff format --check", "mypy", "lint-imports"):
        assert f"/bin/{tool}" in recipe, tool
    ci = [line for line in (REPO / ".ci/run").read_text().splitlines() if line.startswith("make ")]
    assert ci == ["make lint", "make test"]
