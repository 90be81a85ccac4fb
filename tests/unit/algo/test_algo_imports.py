"""pipeline.algo depends on torch and the standard library only, and exports what it documents."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pipeline.algo

ALGO_DIR = Path(pipeline.algo.__file__).parent
REPO_ROOT = ALGO_DIR.parent.parent

# Run in a fresh interpreter: snapshot what `import torch` alone pulls in (numpy, sympy, ... depending on
# the install), then import pipeline.algo and report only the modules that import added.
PROBE = """
import json, sys, warnings
warnings.simplefilter("ignore")
import torch
before = set(sys.modules)
import pipeline.algo
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_importing_algo_adds_only_pipeline_and_stdlib_modules():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    added = json.loads(out.stdout.strip().splitlines()[-1])
    assert "pipeline.algo" in added
    foreign = [
        name
        for name in added
        if name not in ("pipeline", "pipeline.algo")
        and not name.startswith("pipeline.algo.")
        and name.split(".")[0] not in sys.stdlib_module_names
    ]
    assert foreign == []


def test_algo_sources_import_only_torch_stdlib_and_algo():
    # Static check as well: catches imports inside functions that the runtime probe would not execute.
    for path in sorted(ALGO_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}: use absolute imports"
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                ok = top == "torch" or top in sys.stdlib_module_names or name.startswith("pipeline.algo")
                assert ok, f"{path.name} imports {name}"


def test_all_names_exist_and_are_documented():
    for name in pipeline.algo.__all__:
        obj = getattr(pipeline.algo, name)
        if callable(obj):
            assert obj.__doc__, f"{name} has no docstring"
    assert len(set(pipeline.algo.__all__)) == len(pipeline.algo.__all__)
