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
