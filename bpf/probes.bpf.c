// SPDX-License-Identifier: GPL-2.0
/* Feature probes: tiny programs whose successful load proves a kernel feature.
 * obi/kernel/probes.py loads them one at a time (autoload off for the others), so a
 * program the kernel rejects only fails its own probe. Nothing here is attached for real
 * except probe_tc (briefly, to a tcx hook of lo in a throw-away network namespace). */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

/* Sockets for the sockops/sk_msg probes. Key: u32 (unused), value: socket cookie.
 * Written by probe_sockops only if ever attached (never), read by nobody. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} probe_sockhash SEC(".maps");

static long loop_step(__u32 index, void *ctx)
{
	__u32 *sum = ctx;

	*sum += index;
	return 0;
}

/* Hook: tc (cls_bpf). Context: __sk_buff. Maps: none.
 * Needs the bpf_loop helper (5.17) with a static callback. Returns TC_ACT_OK. */
SEC("tc")
int probe_bpf_loop(struct __sk_buff *skb)
{
	__u32 sum = 0;

	bpf_loop(4, loop_step, &sum, 0);
	return sum == 6 ? TC_ACT_OK : TC_ACT_UNSPEC;
}

/* Hook: tc (cls_bpf, or tcx link). Context: __sk_buff. Maps: none. Returns TC_ACT_OK. */
SEC("tc")
int probe_tc(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

/* Hook: sockops (cgroup). Context: bpf_sock_ops. Maps: probe_sockhash (update).
 * Returns 1 (ok). */
SEC("sockops")
int probe_sockops(struct bpf_sock_ops *skops)
{
	__u32 key = 0;

	if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		bpf_sock_hash_update(skops, &probe_sockhash, &key, BPF_ANY);
	return 1;
}

/* Hook: sk_msg (on a sockhash). Context: sk_msg_md. Maps: none.
 * Needs bpf_msg_push_data (4.20). Returns SK_PASS. */
SEC("sk_msg")
int probe_sk_msg(struct sk_msg_md *msg)
{
	if (msg->size == 0xfffffff)
		bpf_msg_push_data(msg, 0, 2, 0);
	return SK_PASS;
}

/* Hook: tracepoint syscalls:sys_enter_getpid (never attached). Context: raw. Maps: none.
 * Uses bpf_probe_write_user, which kernel lockdown (integrity) forbids. Returns 0. */
SEC("tracepoint/syscalls/sys_enter_getpid")
int probe_write_user(void *ctx)
{
	__u64 zero = 0;

	if (bpf_get_current_pid_tgid() == 0)
		bpf_probe_write_user((void *)0, &zero, sizeof(zero));
	return 0;
}
