"""How a failed load is told apart (no root): a helper the kernel lacks is a missing
feature; anything else the verifier refuses is our program, named with its count."""

from __future__ import annotations

from obi.errors import BpfError, MissingFeature, ProgramRejected
from obi.kernel.loader import classify, flag_names, verifier_log

TOO_LARGE = """libbpf: prog 'obi_tc_ingress': BPF program load failed: Argument list too long
libbpf: prog 'obi_tc_ingress': -- BEGIN PROG LOAD LOG --
0: R1=ctx() R10=fp0
; int obi_tc_ingress(struct __sk_buff *skb) @ ingress.bpf.c:340
2671: (4f) r1 |= r7
2672: (4f) r1 |= r2
2673: (57) r1 &= 255
2674: (b7) r3 = 16
BPF program is too large. Processed 1000001 insn
processed 1000001 insns (limit 1000000) max_states_per_insn 4 total_states 92072 peak_states 154419 mark_read 0
-- END PROG LOAD LOG --
libbpf: prog 'obi_tc_ingress': failed to load: -7
libbpf: failed to load object '/x/ingress.bpf.o'"""

# A 5.15 kernel, which does not know helper 181 (bpf_loop) by name.
OLD_KERNEL = """libbpf: prog 'obi_tc_ingress': BPF program load failed: Invalid argument
libbpf: prog 'obi_tc_ingress': -- BEGIN PROG LOAD LOG --
; bpf_loop(MAX_ROUNDS, seg_round, &c, 0);
112: (85) call unknown#181
unknown func unknown#181
processed 94 insns (limit 1000000) max_states_per_insn 0 total_states 5 peak_states 5 mark_read 3
-- END PROG LOAD LOG --"""


def test_a_too_large_program_is_ours_named_with_its_count():
    err = classify(BpfError("load ingress.bpf.o", 7, TOO_LARGE), "ingress.bpf.o")
    assert isinstance(err, ProgramRejected) and not isinstance(err, MissingFeature)
    assert err.program == "obi_tc_ingress" and err.processed == 1_000_001 and err.object == "ingress.bpf.o"
    assert err.tail[-1].startswith("processed 1000001 insns")
    msg = str(err)
    # The log mentions bpf_loop's callers, but nothing is missing: no "needs Linux" here.
    assert "obi_tc_ingress" in msg and "1,000,001" in msg and "BPF program is too large" in msg
    assert "needs Linux" not in msg


def test_an_unknown_helper_is_a_missing_feature_with_its_kernel():
    err = classify(BpfError("load ingress.bpf.o", 22, OLD_KERNEL), "ingress.bpf.o")
    assert isinstance(err, MissingFeature)
    assert err.feature == "BPF helper bpf_loop" and err.min_kernel == "5.17"


def test_a_helper_forbidden_for_the_program_type_is_missing():
    log = "-- BEGIN PROG LOAD LOG --\nprogram of this type cannot use helper bpf_probe_write_user#36\n-- END PROG LOAD LOG --"
    err = classify(BpfError("load x.bpf.o", 22, log), "x.bpf.o")
    assert isinstance(err, MissingFeature) and "bpf_probe_write_user" in err.feature


def test_verifier_log_keeps_only_the_verifier_lines():
    lines = verifier_log(TOO_LARGE)
    assert lines[0].startswith("0: R1=ctx()") and not any(ln.startswith("libbpf:") for ln in lines)


def test_flag_names():
    assert flag_names(0) == "none" and flag_names(7) == "hdr_insert+hdr_read+tcp"
