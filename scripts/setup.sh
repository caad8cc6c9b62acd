#!/usr/bin/env bash
# Idempotent set-up for a Debian 12 machine, as root: system packages, the BPF objects,
# and the project with its Python dependencies in ./.venv. Safe to run again: it only
# installs what is missing. Used by scripts/demo, scripts/test and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  clang llvm make gcc libc6-dev          # compile bpf/*.bpf.c (clang -target bpf)
  clang-format                           # C style check in scripts/test
  libbpf-dev libbpf1 bpftool             # libbpf headers at build time, libbpf.so.1 at run time
  iptables                               # userspace datapath (NFQUEUE rules)
  libnetfilter-queue-dev                 # builds netfilterqueue, for the benchmark's no-op NFQUEUE arm
  iproute2 iputils-ping                  # namespaces, veth, tc
  curl openssl wrk                       # demo, tests (TLS), benchmarks
  util-linux libcap2-bin                 # setpriv/capsh for least-privilege tests
  python3-venv python3-dev               # the project's virtualenv
)

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root (it installs packages and the tests load BPF programs)" >&2
  exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

make -s -C bpf

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Re-install only when the project metadata or the C extension (fallback/_nfq.c, built by
# pip through setup.py) changed since the last install.
stamp=.venv/.obi-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] || [ fallback/_nfq.c -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test,bench]'
  touch "$stamp"
fi
echo "setup: ok ($(.venv/bin/obi version))"
