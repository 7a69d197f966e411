#!/usr/bin/env bash
# Install LiteLLM's proxy into a virtual environment of its own (default .venv-litellm),
# for `make bench` (bench/litellm_proxy.py): the relay a Python user would pick, measured
# beside ours. Never in the project's venv: litellm[proxy] caps huggingface_hub < 2 (the
# project needs 2.x), openai < 3 and rich < 14. The harness only runs its CLI.
#
# Pinned: a baseline must not move between runs, and newer releases' proxy extra needs
# packages the registry does not serve.
#
# Idempotent: a marker named after the version makes a second run return at once.
# usage: litellm-venv.sh [VENV]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$here/.venv-litellm}
version=1.106.12
marker=$venv/.litellm-$version

[ -f "$marker" ] && [ -x "$venv/bin/litellm" ] && exit 0

echo "installing litellm[proxy] $version into $venv (once; about a minute)"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q "litellm[proxy]==$version"
rm -f "$venv"/.litellm-*
touch "$marker"
