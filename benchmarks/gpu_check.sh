#!/usr/bin/env bash
# privtune GPU check: the CUDA-only training paths on an SD v1.5-sized model, in one command.
#
#   bash benchmarks/gpu_check.sh             # one NVIDIA GPU, about 8 minutes at most (--budget-s 420 stops
#                                            # starting rows after 7 min): runs/gpu_check/gpu_check.{json,md}
#   bash benchmarks/gpu_check.sh --dry-run   # tiny sizes, the same code path, < 3 min on one CPU core:
#                                            # runs/gpu_check_dry/gpu_check.{json,md}
#
# Any other argument goes to benchmarks/gpu_check.py (--out DIR, --rows, --batch-size, ... ; --help lists them
# and its docstring says what each row measures). runs/ is git-ignored. Exit status: 0 all rows ran or were
# skipped with a reason, 1 some row failed (its reason is in the table), 2 no CUDA without --dry-run.
#
# Python environment (the optional part, run only when the packages are missing):
#   1. $PYTHON if set, else the repository's .venv/bin/python if there is one, else python3 -- used as it is
#      when privtune's training, DP-SGD and attack modules import with it (privtune itself is imported from
#      this checkout, so it needs no install).
#   2. Else, when a folder of wheels exists ($PRIVTUNE_WHEELS, default .whl/ in the repository: the packages
#      that machine lacks, e.g. diffusers, opacus, omegaconf, antlr4-python3-runtime, datasets, dill,
#      multiprocess, kornia, kornia-rs, bitsandbytes), they are installed with
#      `pip install --no-index --no-deps --target /tmp/privtune-site` on top of that Python (no network).
#   3. Else a virtual environment at $PRIVTUNE_GPU_VENV (default /tmp/privtune-gpu-venv, with the system's
#      site-packages, so a preinstalled CUDA torch is kept) gets `pip install -e . bitsandbytes`; that needs a
#      package index (PIP_INDEX_URL / PIP_FIND_LINKS work as usual).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" WANDB_MODE="${WANDB_MODE:-offline}" PYTHONUNBUFFERED=1

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  PY=python3
fi

importable() {  # the modules the check runs through; prints what is missing
  "$1" - <<'EOF'
import importlib, sys
sys.path.insert(0, ".")
missing = []
for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "opacus", "omegaconf", "datasets", "kornia",
             "privtune.trainers.dpsgd", "privtune.eval.stage", "privtune.eval.attacks"):
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any failure means this Python cannot run the check
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
if missing:
    print("gpu_check.sh: not importable with " + sys.executable + ": " + "; ".join(missing), file=sys.stderr)
    sys.exit(1)
EOF
}

if ! importable "$PY"; then
  WHEELS="${PRIVTUNE_WHEELS:-$REPO/.whl}"
  if [[ -d "$WHEELS" ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "gpu_check.sh: installing the wheels in $WHEELS into /tmp/privtune-site (no index)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/privtune-site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/privtune-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    VENV="${PRIVTUNE_GPU_VENV:-/tmp/privtune-gpu-venv}"
    echo "gpu_check.sh: creating $VENV (system site-packages kept) and installing privtune + bitsandbytes into it"
    [[ -x "$VENV/bin/python" ]] || "$PY" -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -m pip install -q -e . bitsandbytes
    PY="$VENV/bin/python"
  fi
  importable "$PY" || { echo "gpu_check.sh: still not importable; see above" >&2; exit 2; }
fi

echo "gpu_check.sh: $("$PY" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())')"
exec "$PY" benchmarks/gpu_check.py "$@"
