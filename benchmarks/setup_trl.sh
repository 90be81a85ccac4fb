#!/usr/bin/env bash
# Create benchmarks/.venv-trl: TRL's GRPOTrainer in its own venv, with the same CPU torch and transformers as
# .venv so the comparison runs the same kernels. Idempotent: a stamp holding this script's hash skips the work.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3.11}
VENV=.venv-trl
stamp="$VENV/.bench-install"
want=$(sha256sum setup_trl.sh | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup_trl: $VENV is up to date"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --progress-bar off)
# Pinned exactly: a looser torch spec pulls the CUDA build (several GB).
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" "trl==1.16.0" "transformers==5.19.0" "torch==2.13.0" "psutil"
"$VENV/bin/python" -c "import torch, transformers, trl; print('setup_trl: ok: torch', torch.__version__, \
'| transformers', transformers.__version__, '| trl', trl.__version__)"
echo "$want" > "$stamp"
