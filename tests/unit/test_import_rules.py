"""STYLE.md rule 1, checked on the source: the driver side (pipeline/) never imports vLLM or DeepSpeed."""

import ast

import pytest

from tests.conftest import REPO

FORBIDDEN = {"vllm", "deepspeed"}
SOURCES = sorted((REPO / "pipeline").rglob("*.py"))


def imported_roots(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_driver_side_never_imports_vllm_or_deepspeed(path):
    assert not FORBIDDEN & set(imported_roots(path))


def test_the_rule_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from vllm import LLM\n")
    assert "vllm" in set(imported_roots(bad))


IMPORT_PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("vllm", "deepspeed"))))
"""


def heavy_modules_loaded_by(*modules: str) -> list[str]:
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, *modules],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_driver_entry_points_load_neither_vllm_nor_deepspeed_even_indirectly():
    # The AST rule above sees direct imports only; this runs the imports, so a chain through actors/ shows up.
    assert heavy_modules_loaded_by("pipeline.cli", "pipeline.run", "pipeline.rl", "pipeline.rl_roles") == []


def test_the_import_probe_sees_an_indirect_import():
    assert "deepspeed" in heavy_modules_loaded_by("tests.unit.import_probe_planted")


# Each module in actors/ is one role; the modules every role shares (HF helpers, reward-model scoring, sequence
# forwards) and the training package are not roles. No role module, nor anything in actors/training, imports a
# role module.
SHARED = {"__init__", "hf", "scoring", "sequences"}
ROLES = sorted(p.stem for p in (REPO / "actors").glob("*.py") if p.stem not in SHARED)
CHECKED = sorted((REPO / "actors").glob("*.py")) + sorted((REPO / "actors" / "training").rglob("*.py"))


def imported_roles(path, roles=ROLES):
    """The role modules (names in actors/) that the module at `path` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("actors.") and n.split(".")[1] in roles}
    return found - {path.stem if path.parent.name == "actors" else None}


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(REPO)))
def test_no_role_module_imports_another_role_module(path):
    assert imported_roles(path) == set()


def test_the_role_rule_sees_a_planted_import(tmp_path):
    bad = tmp_path / "actors" / "rollout.py"
    bad.parent.mkdir()
    bad.write_text(
        "import actors.hf\nfrom actors import sequences\n\n\ndef f():\n"
        "    from actors.reference import ReferenceWorker\n    from actors import reward\n"
    )
    assert imported_roles(bad, roles=["reference", "reward", "rollout"]) == {"reference", "reward"}
