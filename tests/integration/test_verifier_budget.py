"""Verifier budget: every program of the kernel path, in every mode, verifies in at most a
quarter of the kernel's 1,000,000-instruction limit on this machine's kernel.

Loads every object (egress, ingress, both thread hooks, the adoption iterator) under every
combination of obi_cfg_flags, one program at a time, reads each program's verified_insns
(BPF_OBJ_GET_INFO_BY_FD) and prints the table. A program the verifier rejects is a failure
with the verifier's message, not a skip: only a kernel feature that the probes report
missing skips.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("needs root (loads BPF programs)", allow_module_level=True)
try:
    from obi.kernel import libbpf, loader, probes
except OSError as e:  # libbpf.so.1 missing
    pytest.skip(f"kernel path unavailable: {e}", allow_module_level=True)


def test_every_program_within_a_quarter_of_the_verifier_limit():
    objects = (*loader.OBJECTS, *loader.THREAD_HOOKS.values(), loader.ADOPT_ITER[0])
    missing_objs = [o for o in objects if not os.path.exists(libbpf.object_path(o))]
    assert not missing_objs, f"BPF objects not built: {missing_objs} (run `make -C bpf`)"
    rows = loader.budget_table()
    print("\n" + loader.format_table(rows))
    missing = [r for r in rows if r.missing_feature]
    if missing:
        bpf_loop = probes.probe_bpf_loop()
        if bpf_loop.ok is False:
            pytest.skip(f"kernel lacks bpf_loop ({bpf_loop.detail}): {missing[0].error}")
    failed = [f"{r.object}/{r.program} [{loader.flag_names(r.flags)}]: {r.error}" for r in rows if not r.ok]
    assert not failed, "\n".join(failed)
    over = [r for r in rows if r.verified_insns > loader.BUDGET]
    assert not over, [(r.object, r.program, loader.flag_names(r.flags), r.verified_insns) for r in over]
    # 8 modes x (sockops, sk_msg, tc ingress, tc egress, recv_length, sys_enter, sys_exit, adopt)
    assert len(rows) == 8 * 8
    assert all(r.verified_insns > 0 for r in rows), "verified_insns not reported (kernel < 5.16?)"
