// SPDX-License-Identifier: GPL-2.0
/* Per-thread linking (DESIGN decision 5): when a thread of a selected process reads from a
 * server connection whose current request tc has parsed (READY), that thread is serving
 * that request; thread_ctx remembers the server span so that sk_msg makes the thread's
 * outgoing requests its children. kprobes/fentry are unavailable here, so the hook is the
 * sock:sock_recv_length tracepoint (process context, called from sock_recvmsg for
 * recv/recvfrom/recvmsg/read on sockets). */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "obi_abi.h"
#include "obi_http.h"
#include "obi_maps.h"
#include "obi_net.h"

char LICENSE[] SEC("license") = "GPL";

/* Just the fields we read; CO-RE relocates them against the running kernel's BTF (names
 * are matched through the kernel's anonymous unions). */
struct in6_addr___obi {
	union {
		__u32 u6_addr32[4];
	} in6_u;
} __attribute__((preserve_access_index));

struct sock_common {
	__u32 skc_daddr;
	__u32 skc_rcv_saddr;
	__u16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	__u16 _pad0; /* layout is CO-RE relocated: local offsets do not matter */
	struct in6_addr___obi skc_v6_daddr;
	struct in6_addr___obi skc_v6_rcv_saddr;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
} __attribute__((preserve_access_index));

/* /sys/kernel/tracing/events/sock/sock_recv_length/format */
struct recv_length_args {
	__u64 common;
	struct sock *sk;
	__u16 family;
	__u16 protocol;
	int ret;
	int flags;
	__u32 _pad0;
};

/* Hook: tracepoint sock:sock_recv_length. Context: the raw tracepoint record above.
 * Maps: selected_tgids, ingress_conns (read), thread_ctx (write), counters. Returns 0. */
SEC("tracepoint/sock/sock_recv_length")
int obi_recv_length(struct recv_length_args *a)
{
	if (a->ret <= 0 || a->protocol != 6 /* IPPROTO_TCP */ || !tgid_selected())
		return 0;
	struct sock *sk = a->sk;
	struct obi_tuple t = {};
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);

	t.local_port = BPF_CORE_READ(sk, __sk_common.skc_num);
	t.peer_port = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (family == OBI_AF_INET) {
		__u32 l = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		__u32 r = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		t.family = OBI_AF_INET;
		__builtin_memcpy(t.local_addr, &l, 4);
		__builtin_memcpy(t.peer_addr, &r, 4);
	} else if (family == OBI_AF_INET6) {
		__u32 l[4], r[4];
		BPF_CORE_READ_INTO(&l, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr32);
		BPF_CORE_READ_INTO(&r, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr32);
		tuple_set_addrs6(&t, l, r);
	} else {
		return 0;
	}
	struct http_state *st = bpf_map_lookup_elem(&ingress_conns, &t);
	if (!st || st->role != OBI_ROLE_SERVER || !(st->bits & HS_READY))
		return 0;
	struct thread_ctx tc = {};
	tc.conn = t;
	__builtin_memcpy(tc.trace_id, st->trace_id, 16);
	__builtin_memcpy(tc.span_id, st->span_id, 8);
	tc.trace_flags = st->trace_flags;
	__u64 id = bpf_get_current_pid_tgid();
	bpf_map_update_elem(&thread_ctx, &id, &tc, BPF_ANY);
	count(OBI_CNT_THREAD_LINKS);
	return 0;
}
