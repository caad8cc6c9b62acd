// SPDX-License-Identifier: GPL-2.0
/* Adoption of TCP connections established before the agent started (sockops only sees
 * new ones). KernelDatapath.start() runs this iterator once, after attaching, from a
 * thread inside the watched netns (a TCP iterator walks the netns of its creator).
 *
 * Each established IPv4/IPv6 socket that sk_msg does not know yet (no egress_st):
 * - local port in server_ports: a server connection, counted only: tc follows its
 *   requests and responses on the wire, and server sockets never go into sock_hash
 *   (obi_maps.h says why);
 * - any other, if its inode is in adopt_inodes (userspace lists the socket inodes of the
 *   selected processes there before running this): client role, gets an egress_st marked
 *   HS_RESYNC and goes into sock_hash, so that sk_msg runs on its sends. Sockets of other
 *   processes are left alone, as sockops leaves them.
 * HS_RESYNC makes the parser skip whole writes until one starts with a valid start line
 * (the same wait tc uses after a sequence gap, obi_http.h parse_step): nothing is ever
 * inserted into the middle of a body. A client socket is adopted only at a clear message
 * boundary: everything it wrote is acknowledged, and the peer sent data after it got the
 * last byte (the previous response came back), or nothing was sent yet. Otherwise a request
 * may be in flight (or half written): the socket is left alone, as before.
 * "Sent data after": snd_wl1 is the peer sequence number of the last segment that
 * acknowledged new bytes of ours or brought new data (tcp_may_update_window). If that was a
 * pure ACK of our last write, it equals rcv_nxt; if data came after it, it is the start of
 * a data segment, before rcv_nxt. Exact, where timestamps in jiffies were not: a response
 * and the next request within one jiffy (4 ms at HZ=250) looked like a finished exchange.
 * Not adopted: TLS option callbacks (sockops sets them at establishment only).
 *
 * Output (read by userspace to count): one byte per established socket, 'S' a server
 * connection (left to tc), 'C' a client socket adopted, 'o' a socket of a process that is
 * not selected, 'b' skipped (client not at a boundary), 'k' already known, 'e' the
 * sock_hash update failed. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "obi_abi.h"
#include "obi_http.h"
#include "obi_maps.h"
#include "obi_net.h"

char LICENSE[] SEC("license") = "GPL";

#define OBI_TCP_ESTABLISHED 1

/* Kernel structs, only the fields read; CO-RE relocates them (see obi_core.h). */
struct bpf_iter_meta {
	void *seq;
	__u64 session_id;
	__u64 seq_num;
} __attribute__((preserve_access_index));

struct sock_common {
	unsigned short skc_family;
	volatile unsigned char skc_state;
	__u8 _pad0;
	__u16 skc_num;
	__u16 _pad1;
} __attribute__((preserve_access_index));

struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
	__u32 uid;
	__u32 _pad0;
} __attribute__((preserve_access_index));

struct inode {
	unsigned long i_ino;
} __attribute__((preserve_access_index));

struct file {
	struct inode *f_inode;
} __attribute__((preserve_access_index));

struct socket {
	struct file *file;
} __attribute__((preserve_access_index));

/* The start of every TCP socket (struct tcp_sock begins with it). */
struct sock {
	struct socket *sk_socket;
} __attribute__((preserve_access_index));

struct tcp_sock {
	__u32 snd_una;   /* first byte not acknowledged */
	__u32 write_seq; /* next byte the process writes */
	__u32 snd_wl1;   /* peer sequence of the last window/ack update (see above) */
	__u32 rcv_nxt;   /* next peer byte expected */
} __attribute__((preserve_access_index));

/* Socket inodes of the selected processes (as in /proc/<pid>/fd). Key: inode. Value: 1.
 * Filled by userspace before the iterator runs; this object's own map. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u32);
} adopt_inodes SEC(".maps");

static __always_inline void emit(struct bpf_iter_meta *meta, char what)
{
	bpf_seq_write(meta->seq, &what, 1);
}

/* Hook: iter/tcp, run once per start. Context: one socket of the netns (or NULL at the
 * end). Maps: server_ports, adopt_inodes (read), egress_st (create), sock_hash (insert). */
SEC("iter/tcp")
int obi_adopt(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;

	if (!skc || skc->skc_state != OBI_TCP_ESTABLISHED)
		return 0;
	if (skc->skc_family != OBI_AF_INET && skc->skc_family != OBI_AF_INET6)
		return 0;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	if (bpf_sk_storage_get(&egress_st, tp, 0, 0)) {
		emit(ctx->meta, 'k'); /* sk_msg already parses it (sockops added it since attach) */
		return 0;
	}
	if (port_selected(skc->skc_num)) {
		emit(ctx->meta, 'S');
		return 0;
	}
	struct socket *sock = ((struct sock *)tp)->sk_socket;
	__u64 ino = sock && sock->file && sock->file->f_inode ? sock->file->f_inode->i_ino : 0;
	if (!ino || !bpf_map_lookup_elem(&adopt_inodes, &ino)) {
		emit(ctx->meta, 'o');
		return 0;
	}
	if (tp->write_seq != tp->snd_una || tp->snd_wl1 == tp->rcv_nxt) {
		emit(ctx->meta, 'b');
		return 0;
	}
	struct http_state *st = bpf_sk_storage_get(&egress_st, tp, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return 0;
	/* Before the socket enters sock_hash: its first sk_msg run sees this state. */
	st->phase = PH_IDLE;
	st->role = OBI_ROLE_CLIENT;
	st->bits = HS_RESYNC;
	__u64 cookie = bpf_get_socket_cookie(tp);
	if (bpf_map_update_elem(&sock_hash, &cookie, tp, BPF_NOEXIST)) {
		emit(ctx->meta, 'e');
		return 0;
	}
	emit(ctx->meta, 'C');
	return 0;
}
