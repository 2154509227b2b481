#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at <repo>/.venv and install the pinned stack.
# Idempotent: a complete environment is detected by a stamp file holding the hash of the requirements.
#
# torch build selection:
#   - TORCH_INDEX_URL set            -> torch from that index (e.g. https://download.pytorch.org/whl/cu128)
#   - a local CPU wheel is findable  -> that wheel (pip's find-links), no CUDA packages
#   - no NVIDIA GPU (no nvidia-smi)  -> the CPU build from https://download.pytorch.org/whl/cpu
#   - otherwise                      -> PyPI's default (CUDA) build
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON_BIN="${PYTHON:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3
TORCH_VERSION="2.13.0"
MONAILABEL_VERSION="0.8.5"

"$PYTHON_BIN" - <<'PY' || { echo "error: Python 3.11 is required (monailabel 0.8.5 imports distutils, removed in 3.12)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)
PY

stamp_hash="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)"
if [[ -f "$VENV/.installed" && "$(cat "$VENV/.installed")" == "$stamp_hash" ]]; then
  exit 0
fi

echo "[setup] creating $VENV with $($PYTHON_BIN --version)"
"$PYTHON_BIN" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip wheel

if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
  "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
elif "${PIP[@]}" install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
  echo "[setup] torch $TORCH_VERSION from a local wheel"
elif ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "[setup] no NVIDIA GPU found: installing the CPU build of torch"
  "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
else
  echo "[setup] NVIDIA GPU found: installing the CUDA build of torch from PyPI"
  "${PIP[@]}" install "torch==$TORCH_VERSION"
fi

echo "[setup] installing requirements.txt"
"${PIP[@]}" install -q -r "$ROOT/requirements.txt"
"${PIP[@]}" install -q --no-deps "monailabel==$MONAILABEL_VERSION"
echo "[setup] installing this project in editable mode (pyproject.toml: lib, bench, ADLDenoiseLib)"
# (setuptools' editable build prints a long warning about same-named folders; kept in a log unless it fails)
"${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT" >"$VENV/editable-install.log" 2>&1 \
  || { cat "$VENV/editable-install.log" >&2; echo "error: the editable install of the project failed" >&2; exit 1; }
"$VENV/bin/python" -c "import lib, bench, ADLDenoiseLib" || { echo "error: the editable install of the project failed" >&2; exit 1; }
"$VENV/bin/python" -c "import torch, monai, SimpleITK, pydicom, monailabel; print('[setup] torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu', '| monai', monai.__version__, '| monailabel', monailabel.__version__)"
echo "$stamp_hash" > "$VENV/.installed"
