#!/usr/bin/env bash
# System packages the tests and the benchmark use. Installed only when running as root
# (CI and fresh machines); otherwise we say what is missing and go on.
set -euo pipefail
want=(nginx wrk)
missing=()
for cmd in "${want[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$cmd")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "note: missing system packages (${missing[*]}); install them to run every test" >&2
fi
