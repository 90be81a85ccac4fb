"""No code path of ours unpickles a file: weights load from safetensors (transformers' default) or through
`torch.load(weights_only=True)`. An AST scan of every project source enforces it, and the scan itself is tested
on snippets that break each rule, so it cannot pass by seeing nothing.

Allowed on purpose: `pickle.loads` of the experience stream's payloads (pipeline/stream.py, actors/learner.py).
Those bytes are made by our own stream (`pickle.dumps` in pipeline/stream.py) and travel inside the run's Ray
object store; they never come from a user's file."""

import ast
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

SOURCES = ("pipeline", "actors", "cluster", "scripts")
ALLOWED = {("pipeline/stream.py", "pickle.loads"), ("actors/learner.py", "pickle.loads")}
UNPICKLERS = {
    "pickle": {"load", "loads", "Unpickler"},
    "cloudpickle": {"load", "loads"},
    "dill": {"load", "loads"},
    "joblib": {"load"},
    "pandas": {"read_pickle"},
    "pd": {"read_pickle"},
}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def violations(source: str) -> list[str]:
    """Each unsafe deserialization in `source`, as 'line: call'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in UNPICKLERS:
            for alias in node.names:
                if alias.name in UNPICKLERS[node.module]:
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        module, _, attr = name.rpartition(".")
        if name == "torch.load" and keyword(node, "weights_only") is not True:
            found.append(f"{node.lineno}: torch.load without weights_only=True")
        elif attr in UNPICKLERS.get(module.rpartition(".")[2], ()):
            found.append(f"{node.lineno}: {module.rpartition('.')[2]}.{attr}")
        elif attr in ("load", "loadtxt") and module in ("np", "numpy") and keyword(node, "allow_pickle") is True:
            found.append(f"{node.lineno}: {name}(allow_pickle=True)")
        elif attr == "from_pretrained" and keyword(node, "use_safetensors") is False:
            found.append(f"{node.lineno}: from_pretrained(use_safetensors=False)")
        elif attr == "save_pretrained" and keyword(node, "safe_serialization") is False:
            found.append(f"{node.lineno}: save_pretrained(safe_serialization=False)")
        elif keyword(node, "weights_only") is False:
            found.append(f"{node.lineno}: {name}(weights_only=False)")
    return found


def project_sources() -> list[Path]:
    files = [p for d in SOURCES for p in (REPO / d).rglob("*.py")]
    assert len(files) > 30  # the scan really reads the project
    return files


def test_no_source_unpickles_a_file():
    bad = []
    for path in project_sources():
        rel = str(path.relative_to(REPO))
        for v in violations(path.read_text()):
            if (rel, v.split(": ", 1)[1]) not in ALLOWED:
                bad.append(f"{rel}:{v}")
    assert not bad, "unsafe deserialization (load weights with safetensors or torch.load(weights_only=True)):\n" + (
        "\n".join(bad)
    )


def test_the_allowed_unpickling_is_still_where_it_is_said_to_be():
    """If the stream stops pickling, the exception must go too (a stale allowance hides a new use)."""
    for rel, call in ALLOWED:
        assert any(v.endswith(f": {call}") for v in violations((REPO / rel).read_text())), rel


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\nstate = torch.load(path)",
        "import torch\nstate = torch.load(path, weights_only=False)",
        "import torch\nstate = torch.load(path, map_location='cpu', weights_only=flag)",
        "import pickle\nwith open(p, 'rb') as f:\n    x = pickle.load(f)",
        "import pickle\nx = pickle.loads(Path(p).read_bytes())",
        "from pickle import loads\n",
        "import cloudpickle\nx = cloudpickle.load(f)",
        "import pandas as pd\ndf = pd.read_pickle(p)",
        "import numpy as np\na = np.load(p, allow_pickle=True)",
        "import joblib\nm = joblib.load(p)",
        "m = AutoModelForCausalLM.from_pretrained(d, use_safetensors=False)",
        "model.save_pretrained(d, safe_serialization=False)",
        "engine.load_checkpoint(d, weights_only=False)",
    ],
)
def test_the_scan_catches_each_unsafe_form(snippet):
    assert violations(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\nstate = torch.load(path, map_location='cpu', weights_only=True)",
        "import numpy as np\na = np.load(p)",
        "from safetensors.torch import load_file\nstate = load_file(p)",
        "m = AutoModelForCausalLM.from_pretrained(d)",
    ],
)
def test_the_scan_passes_safe_forms(snippet):
    assert violations(snippet) == []


class RunsCode:
    """Unpickling this creates a file: the stand-in for any code a hostile pickle would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("backend, zero_stage", [("torch", 0), ("deepspeed", 2)])
def test_a_learner_checkpoint_that_would_run_code_is_refused(task_dir, tmp_path, backend, zero_stage):
    """Every file of a real checkpoint loads weights-only; each one, replaced by a pickle that runs code, is
    refused without running it (DeepSpeed's own loader would unpickle it)."""
    from tests.unit.test_learner import learner, make_batch, on_policy

    lrn = learner(task_dir, backend=backend, zero_stage=zero_stage)
    lrn.train_step(on_policy(lrn, make_batch(4, seed=3)))
    lrn.save_checkpoint(tmp_path / "ckpt")
    lrn.load_checkpoint(tmp_path / "ckpt")  # the genuine checkpoint loads weights-only
    files = [p for p in (tmp_path / "ckpt").rglob("*.pt")]
    assert files
    marker = tmp_path / "code-ran"
    for path in files:
        genuine = path.read_bytes()
        torch.save({"state": RunsCode(marker)}, path)
        with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
            lrn.load_checkpoint(tmp_path / "ckpt")
        assert not marker.exists(), f"loading {path.name} ran code"
        path.write_bytes(genuine)


def test_a_pytorch_bin_model_that_would_run_code_is_refused(task_dir, tmp_path):
    """A model dir with weights as a pickle (`pytorch_model.bin`, no safetensors) loads through transformers'
    weights-only path, as every model of ours does (`from_pretrained`): a hostile pickle is refused, not run."""
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_bytes((task_dir / "models/policy/config.json").read_bytes())
    marker = tmp_path / "code-ran"
    torch.save({"model.embed_tokens.weight": RunsCode(marker)}, model_dir / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        AutoModelForCausalLM.from_pretrained(model_dir)
    assert not marker.exists()
