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
 * parses their responses instead (ingress.bpf.c). */
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

static __always_inline struct obi_event *event_reserve(void)
{
	struct obi_event *ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);

	if (!ev)
		count(OBI_CNT_EVENTS_LOST);
	return ev;
}

/* Fill an event from the parse state of the message it describes. */
static __always_inline void event_fill(struct obi_event *ev, __u32 kind, const struct http_state *st,
				       const struct obi_tuple *t, __u64 pid_tgid)
{
	ev->kind = kind;
	ev->flags = 0;
	ev->ts_ns = st->start_ns;
	ev->end_ns = 0;
	ev->pid_tgid = pid_tgid;
	ev->tuple = *t;
	__builtin_memcpy(ev->trace_id, st->trace_id, 16);
	__builtin_memcpy(ev->span_id, st->span_id, 8);
	__builtin_memcpy(ev->parent_id, st->parent_id, 8);
	ev->trace_flags = st->trace_flags;
	ev->tp_count = st->tp_count > 255 ? 255 : st->tp_count;
	ev->status = st->status;
	ev->line_len = st->line_cap;
	ev->tracestate_len = st->ts_len;
	__builtin_memcpy(ev->line, st->line, OBI_LINE_MAX);
	__builtin_memcpy(ev->tp, st->tp, OBI_TP_MAX);
	ev->tp_len = st->tp_len;
	ev->host_len = st->host_len;
	ev->_pad1 = 0;
	__builtin_memcpy(ev->tracestate, st->tracestate, OBI_TRACESTATE_MAX);
	__builtin_memcpy(ev->host, st->host, OBI_HOST_MAX);
}

/* Send an event kept in a map (or scratch); counted if the ring buffer is full. */
static __always_inline void event_output(struct obi_event *ev)
{
	if (bpf_ringbuf_output(&events, ev, sizeof(*ev), 0))
		count(OBI_CNT_EVENTS_LOST);
}

/* A request's headers are complete and its event is built in sc->ev (kind *_SPAN): keep
 * it in open_spans until the response, or, if the connection already has a request waiting
 * for its response, send both as *_REQ (userspace pairs them). `conn`: the connection's
 * ingress_conns state, which counts the requests userspace holds. */
static __always_inline void span_open(struct scratch *sc, struct http_state *conn, __u32 req_kind)
{
	struct obi_tuple *t = &sc->pc.t;
	struct obi_event *old = bpf_map_lookup_elem(&open_spans, t);

	if (!conn)
		return; /* cannot count what userspace must pair: keep nothing */
	if (!old && !conn->queued) {
		bpf_map_update_elem(&open_spans, t, &sc->ev, BPF_ANY);
		return;
	}
	if (old) {
		old->kind = req_kind;
		event_output(old);
		bpf_map_delete_elem(&open_spans, t);
		__sync_fetch_and_add(&conn->queued, 1);
	}
	sc->ev.kind = req_kind;
	event_output(&sc->ev);
	__sync_fetch_and_add(&conn->queued, 1);
}

/* A response's status line (parse state `resp`): complete and send the open span of the
 * connection, or a *_RESP event if userspace holds requests of it (`conn` as above). */
static __always_inline void span_close(const struct obi_tuple *t, const struct http_state *resp,
				       struct http_state *conn, __u32 span_kind, __u32 resp_kind, __u64 pid_tgid)
{
	if (conn && conn->queued) {
		__sync_fetch_and_add(&conn->queued, -1);
		struct obi_event *ev = event_reserve();
		if (ev) {
			event_fill(ev, resp_kind, resp, t, pid_tgid);
			bpf_ringbuf_submit(ev, 0);
		}
		return;
	}
	struct obi_event *ev = bpf_map_lookup_elem(&open_spans, t);
	if (!ev)
		return;
	ev->kind = span_kind;
	ev->status = resp->status;
	ev->end_ns = resp->start_ns;
	if (pid_tgid)
		ev->pid_tgid = pid_tgid;
	event_output(ev);
	bpf_map_delete_elem(&open_spans, t);
}

/* The connection ends (FIN/RST seen by tc): a request left without response goes to
 * userspace as *_REQ (it is reported, status 0, when the agent stops). */
static __always_inline void span_abandon(const struct obi_tuple *t)
{
	struct obi_event *ev = bpf_map_lookup_elem(&open_spans, t);

	if (!ev)
		return;
	ev->kind = ev->kind == OBI_EV_SERVER_SPAN ? OBI_EV_SERVER_REQ : OBI_EV_CLIENT_REQ;
	event_output(ev);
	bpf_map_delete_elem(&open_spans, t);
}

/* --- one round of bpf_loop(MAX_ROUNDS) over a message, in egress.bpf.c and ingress.bpf.c:
 * round_start, then (ROUND_LOAD) the program's own window load, then round_parse and the
 * program's own action. */

enum { ROUND_END = 0, ROUND_LOAD, ROUND_PARSE };

/* ROUND_END: the message is done (every byte parsed, or the stream given up; or no state
 * or scratch, which the verifier wants checked in each callback). ROUND_LOAD: the next byte
 * is outside the window in sc->buf, the program loads the next one (bodies are skipped by
 * arithmetic and need none). ROUND_PARSE: the window holds the next byte. */
static __always_inline int round_start(const struct http_state *st, const struct scratch *sc)
{
	if (!st || !sc)
		return ROUND_END;
	const struct pcur *p = &sc->pc;
	if (p->pos >= p->len || st->phase == PH_LOST)
		return ROUND_END;
	if (st->phase != PH_BODY && st->phase != PH_CHUNK_DATA &&
	    (p->pos < p->win_off || p->pos >= p->win_off + p->win_len))
		return ROUND_LOAD;
	return ROUND_PARSE;
}

/* Parse up to the next action and return it for the program to handle: ACT_NONE when the
 * window or the message ended first, or when the stream is not HTTP/1.x (ACT_LOST, counted
 * here; nothing to handle). */
static __always_inline __u32 round_parse(struct parse_ctx *c, struct pcur *p)
{
	p->act = ACT_NONE;
	bpf_loop(WIN + 1, parse_step, c, 0);
	if (p->act == ACT_LOST) {
		count(OBI_CNT_PARSE_LOST);
		return ACT_NONE;
	}
	return p->act;
}

#endif
