#!/usr/bin/env bash
# System packages and services the tests and the benchmark use. As root (CI, a fresh
# machine) missing packages are installed and a Docker daemon is started if none
# answers; otherwise we say what is missing and go on (those tests then skip, or fail
# with CI=true).
set -euo pipefail

need_pkg() {  # command → Debian package
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || missing+=("$2")
}
missing=()
need_pkg nginx nginx
need_pkg wrk wrk
need_pkg dockerd docker.io
need_pkg npm npm  # the Node clients of tests/node (nodejs comes with it)
need_pkg chromium chromium  # the dashboard tests (Playwright drives it; no browser download)
root=false
[ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 && root=true

if [ ${#missing[@]} -gt 0 ]; then
  if $root; then
    echo "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "note: missing system packages (${missing[*]}); install them to run every test" >&2
  fi
fi

# A Docker daemon for the Docker runtime tests: host networking only, no bridge and no
# iptables (all test traffic stays on loopback).
if command -v docker >/dev/null 2>&1 && ! timeout 10 docker info >/dev/null 2>&1; then
  if $root && command -v dockerd >/dev/null 2>&1; then
    echo "starting dockerd --bridge=none --iptables=false"
    nohup dockerd --bridge=none --iptables=false >/tmp/sparkstack-dockerd.log 2>&1 &
    for _ in $(seq 60); do
      timeout 5 docker info >/dev/null 2>&1 && break
      sleep 0.5
    done
    timeout 10 docker info >/dev/null 2>&1 || { echo "dockerd did not start:" >&2;
      tail -5 /tmp/sparkstack-dockerd.log >&2; }
  else
    echo "note: no Docker daemon answers; the Docker tests will skip (fail with CI=true)" >&2
  fi
fi
