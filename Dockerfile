# syntax=docker/dockerfile:1
# obi-py container image:  docker build -t obi-py .
#
# Stage "build" compiles the BPF programs (clang -target bpf, libbpf headers) and builds
# wheels for obi-py (with its C extension, the NFQUEUE reader) and every dependency. The runtime
# stage installs only those wheels plus the shared libraries and tools the agent runs:
# no compiler, no headers, no kernel sources. Run it as in deploy/kubernetes/daemonset.yaml
# or deploy/compose/docker-compose.yaml (host network and PID, the capability list there).

FROM debian:12 AS build
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        clang llvm libbpf-dev make \
        gcc libc6-dev \
        python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The objects land in obi/_bpf/, which pyproject.toml ships as package data.
RUN make -C bpf
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/build/bin/pip wheel --no-cache-dir --wheel-dir /wheels . \
    && python3 -c "import sys, zipfile, glob; whl = glob.glob('/wheels/obi_py-*.whl')[0]; names = zipfile.ZipFile(whl).namelist(); sys.exit(0 if any(n.endswith('.bpf.o') for n in names) and any('/_nfq.' in n and n.endswith('.so') for n in names) else 'no BPF objects or NFQUEUE reader in ' + whl)"

FROM debian:12-slim AS runtime
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/obi/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# libbpf1: loaded through ctypes; iptables: the userspace datapath;
# iproute2: tc and namespaces for feature probes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv libbpf1 iptables iproute2 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python3 -m venv /opt/obi \
    && /opt/obi/bin/pip install --no-cache-dir --no-index --find-links /wheels obi-py \
    && obi version
# The agent records what it attached here, so `obi cleanup` can undo a crashed run.
VOLUME ["/run/obi"]
EXPOSE 9400
ENTRYPOINT ["obi", "run"]
