/* SPDX-License-Identifier: GPL-2.0 */
/* Every map of the kernel path, declared once. Each .bpf.c includes this header, so each
 * object has the same map definitions; the loader (obi/kernel/datapath.py) creates them
 * with the first object and hands the same fds to the others (bpf_map__reuse_fd), so all
 * programs share one set of maps. */
#ifndef OBI_MAPS_H
#define OBI_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "obi_abi.h"
#include "obi_http.h"

/* Set by userspace before load (obi_abi.h OBI_CFG_*). */
const volatile __u32 obi_cfg_flags = OBI_CFG_HDR_INSERT | OBI_CFG_HDR_READ;

/* Never read: anchors the ABI structs in the object's BTF (a struct only reached through
 * a ring buffer reservation would not be described), so the ABI test can check them. */
const volatile struct obi_event obi_abi_anchor_event;

/* Instrumented processes. Key: tgid. Value: 1. Written by userspace (process scanner),
 * read by sockops (connect), sk_msg (is the sender selected?) and the thread hook. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u32);
} selected_tgids SEC(".maps");

/* Listening ports of instrumented processes. Key: port (host order) as u32. Value: 1.
 * Written by userspace, read by tc ingress (new server connections), sockops (TCP option
 * callbacks of server sockets) and the adoption iterator. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} server_ports SEC(".maps");

/* Client TCP sockets of the watched cgroup, so that sk_msg runs on their sends. Key:
 * socket cookie. Written by sockops (active established callback) and the adoption
 * iterator; entries leave when sockets close. Server (accepted) sockets are never put
 * here: a socket in a sockmap reads through tcp_bpf_recvmsg, whose blocking wait returns
 * EAGAIN when woken without data (the write-space wakeup after a large send does that), so
 * a blocking server saw its keep-alive connection end after a big response. tc egress
 * parses their responses instead (tctracer.bpf.c). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} sock_hash SEC(".maps");

/* Client sockets sk_msg has given up on (not HTTP/1.x, or framing lost: it would only
 * pass their writes on): tc egress takes each out of sock_hash at its next packet, so that
 * it leaves the kernel's sockmap code (sk_msg can neither delete from a sockmap nor read a
 * socket cookie; tc can do both). Key: the connection's tuple as in ingress_conns. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct obi_tuple);
	__type(value, __u32);
} sock_release SEC(".maps");

/* Egress HTTP parse state of a client socket (what the process writes). Socket-local
 * storage, freed with the socket. Created by sockops when a selected process connects
 * (which is what admits the socket to sock_hash) or by the adoption iterator; then
 * written/read by sk_msg. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct http_state);
} egress_st SEC(".maps");

/* Ingress HTTP parse state of a connection (what the peer sends), keyed by the tuple as
 * seen from this host. Created by tc (requests to server_ports) or by sk_msg (a client
 * request went out, so responses will come back). Read/written by tc; read by the thread
 * tracepoint (which server request does this connection carry). LRU bounds it; tc deletes
 * on FIN/RST. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct obi_tuple);
	__type(value, struct http_state);
} ingress_conns SEC(".maps");

/* The tracestate of a server connection's current request (obi_tracestate.h), keyed by
 * the tuple as in ingress_conns. Made by tc ingress when a request has a tracestate header
 * (not preallocated: only such connections take memory), reset at each request, deleted
 * with the connection on SYN/FIN/RST; read by sk_msg for the requests the server sends
 * while serving that request (the ids in it say which request it belongs to). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, struct obi_tuple);
	__type(value, struct ts_state);
} ts_states SEC(".maps");

/* Egress HTTP parse state of a server connection (the responses a selected service
 * writes), keyed by the tuple as in ingress_conns. Created and used by tc egress once
 * ingress_conns holds the connection's server state; deleted on SYN/FIN/RST. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct obi_tuple);
	__type(value, struct http_state);
} server_out SEC(".maps");

/* Which server request each thread is serving. Key: pid_tgid. Written by the
 * sock_recv_length tracepoint when a thread reads a server connection whose request was
 * parsed; read by sk_msg for outgoing requests (parent of the client span); deleted by
 * tc egress when that connection's response goes out. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct thread_ctx);
} thread_ctx SEC(".maps");

/* The open span of each connection: the event of a request whose response has not been
 * seen. Key: the connection's tuple (as in ingress_conns). Written by tc (server requests)
 * and sk_msg (client requests); completed, sent and deleted by the other side at the
 * response (see obi_abi.h on events). LRU bounds what unanswered requests leave. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct obi_tuple);
	__type(value, struct obi_event);
} open_spans SEC(".maps");

/* Span events to userspace (struct obi_event). Lost ones are counted in counters. 16 MiB:
 * ~25k events, about half a second of a busy service if the agent is descheduled. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 << 20);
} events SEC(".maps");

/* enum obi_counter -> u64, per CPU; summed by userspace for stats(). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, OBI_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* Scratch slots: one for programs in process context (sk_msg), one for tc ingress
 * (softirq), one for tc egress (either: it runs where the kernel transmits). Sharing one
 * slot was a real bug: a timer interrupt ending in NET_RX softirq ran tc on the CPU where
 * sk_msg was mid-parse and overwrote its cursor (about 1 request in 3000 lost its header
 * under 32 concurrent clients). */
#define SCRATCH_PROC 0
#define SCRATCH_SOFTIRQ 1
#define SCRATCH_EGRESS 2
#define SCRATCH_SLOTS 3

/* Per-CPU window of bytes being parsed (too big for the 512-byte stack). Key: slot
 * (SCRATCH_PROC for sk_msg, SCRATCH_SOFTIRQ for tc ingress, SCRATCH_EGRESS for tc
 * egress), taken with scratch_get. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SCRATCH_SLOTS);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);

	if (v)
		__sync_fetch_and_add(v, 1); /* a softirq may interrupt us on this CPU mid-update */
}

/* Take the per-CPU scratch slot `idx`, or NULL if another program on this CPU holds it.
 * Per-CPU is not exclusive: a softirq (tc) can interrupt a program running in process
 * context (sk_msg) on the same CPU, and a preemptible kernel can switch tasks mid-program.
 * Each taker adds 1 and then reads: only a taker that reads 1 owns the slot (nesting on
 * one CPU is strict, so a later taker always sees the holder's 1). Release with
 * scratch_put. A busy slot means the message is not parsed (counted, traffic passes). */
static __always_inline struct scratch *scratch_get(__u32 idx)
{
	struct scratch *sc = bpf_map_lookup_elem(&scratch, &idx);

	if (!sc)
		return 0;
	__sync_fetch_and_add(&sc->busy, 1);
	if (*(volatile __u64 *)&sc->busy != 1) {
		__sync_fetch_and_add(&sc->busy, -1);
		count(OBI_CNT_SCRATCH_BUSY);
		return 0;
	}
	return sc;
}

static __always_inline void scratch_put(struct scratch *sc)
{
	__sync_fetch_and_add(&sc->busy, -1);
}

static __always_inline int tgid_selected(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	return bpf_map_lookup_elem(&selected_tgids, &tgid) != 0;
}

static __always_inline int port_selected(__u32 port)
{
	return bpf_map_lookup_elem(&server_ports, &port) != 0;
}

#endif
