"""The kernel path attaches its tracepoints through tracefs, which minimal hosts and
containers often do not mount: the agent mounts it when it starts, and `obi doctor` says
so beforehand. Run in a private mount namespace (unshare -m), so that unmounting tracefs
there leaves the machine's own mounts alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.helpers.skips import skip_module_unless_kernel_path

pytestmark = pytest.mark.root


skip_module_unless_kernel_path({"unshare": "needs unshare (util-linux) for a private mount namespace"})

# Inside the private mount namespace: no tracefs anywhere, then a real KernelDatapath on a
# test host; prints what doctor saw before and what was mounted and attached after start().
SCRIPT = r"""
import json, subprocess
from obi import config, doctor
from obi.kernel import tracefs
from obi.kernel.datapath import KernelDatapath
from obi.demo.topology import Topology
for d in tracefs.TRACEFS_DIRS:
    subprocess.run(["umount", d], capture_output=True)
out = {"before": tracefs.tracefs_mounted()}
out["doctor"] = [c.detail for c in doctor.run_checks(config.load(env={})) if c.name == "tracefs"]
with Topology(["h"], prefix="obitf") as t:
    h = t["h"]
    cfg = config.load(env={"OTEL_EBPF_OPEN_PORT": "8080", "OTEL_EBPF_CGROUP_PATH": h.cgroup})
    dp = KernelDatapath(cfg, lambda span: None, netns=h.netns_path, state_dir="/tmp/obitf-state",
                        thread_hook="sock_recv_length")
    dp.start()
    try:
        out["after"] = tracefs.tracefs_mounted()
        out["links"] = len(dp._links)
    finally:
        dp.stop()
print(json.dumps(out))
"""


def test_agent_mounts_tracefs_when_missing():
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["before"] == ""
    assert out["doctor"] == ["not mounted; the agent mounts it at /sys/kernel/tracing when it starts"]
    assert out["after"] == "/sys/kernel/tracing"
    assert out["links"] == 1  # the sock:sock_recv_length tracepoint, attached by name
    shutil.rmtree("/tmp/obitf-state", ignore_errors=True)
