// SPDX-License-Identifier: GPL-2.0
/* Per-thread linking (docs/architecture.md, decision 5): when a thread of a selected process reads from a
 * server connection whose current request tc has parsed (READY), that thread is serving
 * that request; thread_ctx remembers the server span so that sk_msg makes the thread's
 * outgoing requests its children. kprobes/fentry are unavailable here, so the hook is the
 * sock:sock_recv_length tracepoint (process context, called from sock_recvmsg for
 * recv/recvfrom/recvmsg/read on sockets). */
#include "obi_core.h"

char LICENSE[] SEC("license") = "GPL";

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
	thread_link_sock(a->sk);
	return 0;
}
