// SPDX-License-Identifier: GPL-2.0
/* The tc programs (docs/architecture.md, decision 4), tcx links or clsact filters on the interfaces of the
 * netns the agent watches.
 * Ingress, for TCP segments of
 *  - connections to a selected listening port: parses the requests (start line, headers,
 *    traceparent / tracestate, body framing) and emits SERVER_REQ with the server span's
 *    ids; marks the connection READY so the thread that reads it links to that request;
 *  - connections on which a selected process sent a request (ingress_conns entry made by
 *    sk_msg): parses the responses and emits CLIENT_RESP with the status.
 * Egress, for TCP segments of those server connections: parses the responses the service
 * writes and closes the server span at each status line (SERVER_RESP), ending the serving
 * thread's link. It also takes client sockets that sk_msg gave up on out of sock_hash. (sk_msg could read them, but only on sockets in a sockmap, which breaks
 * blocking reads: obi_maps.h, sock_hash.)
 * Bytes are followed in TCP sequence order per connection and direction: retransmitted
 * bytes are not parsed twice, and after a gap the parser waits for a segment that starts a
 * message. Always returns TC_ACT_OK. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "obi_abi.h"
#include "obi_http.h"
#include "obi_w3c.h"
#include "obi_maps.h"
#include "obi_events.h"
#include "obi_parse.h"
#include "obi_net.h"

char LICENSE[] SEC("license") = "GPL";

/* Payload offset of the segment being parsed lives in pcur.win_off's sibling: we keep it
 * in the scratch cursor's `cur` field (unused on ingress). */
#define payload_off cur

static __always_inline int in_load(struct __sk_buff *skb, struct scratch *sc)
{
	struct pcur *p = &sc->pc;
	__u32 n = p->len - p->pos;

	if (n > WIN)
		n = WIN;
	if (n == 0)
		return -1;
	__u64 m = n;
	asm volatile("%[m] &= 0x7ff" : [m] "+r"(m)); /* explicit bound for the verifier */
	if (m == 0)
		return -1;
	if (bpf_skb_load_bytes(skb, p->payload_off + p->pos, sc->buf, m))
		return -1;
	p->win_off = p->pos;
	p->win_len = n;
	return 0;
}

static __always_inline void server_req_done(struct scratch *sc, struct http_state *st,
                                            struct ts_state *ts)
{
	__u32 flags = 0;
	int valid = (obi_cfg_flags & OBI_CFG_HDR_READ) && tp_parse(st);

	if (valid) {
		flags |= OBI_EVF_TP_VALID; /* trace_id, parent_id, trace_flags from the header */
	} else {
		new_trace_id(st->trace_id);
		__builtin_memset(st->parent_id, 0, 8);
		st->trace_flags = 0x03; /* sampled + random: a fresh random trace id */
	}
	new_span_id(st->span_id);
	st->bits |= HS_READY;
	st->serial++;
	head_push(st, st);
	count(OBI_CNT_SERVER_REQS);
	event_fill(&sc->ev, OBI_EV_SERVER_SPAN, st, &sc->pc.t, 0);
	if (!ts->standin) {
		/* the tracestate (kept only with a valid traceparent) belongs to this span */
		__builtin_memcpy(ts->trace_id, st->trace_id, 16);
		__builtin_memcpy(ts->span_id, st->span_id, 8);
		if (ts_finish(ts, valid))
			ts_compact(ts);
		if (ts->out_len)
			ev_set_tracestate(&sc->ev, ts->buf, ts->out_len);
	}
	sc->ev.flags = flags;
	span_open(sc, st, OBI_EV_SERVER_REQ);
}

/* The thread `tid` served connection t's request, whose response is going out: end its
 * link, so that its next outgoing calls are not children of a finished request. */
static __always_inline void thread_unlink(__u64 tid, const struct obi_tuple *t)
{
	struct thread_ctx *tc = tid ? bpf_map_lookup_elem(&thread_ctx, &tid) : 0;

	if (tc && tuple_eq(&tc->conn, t))
		bpf_map_delete_elem(&thread_ctx, &tid);
}

/* The response to the connection's current request is going out: close the server span
 * (`resp` holds the status and the time of the status line), unlink the serving thread. */
static __always_inline void server_resp(const struct obi_tuple *t, const struct http_state *resp,
                                        struct http_state *in)
{
	__u64 tid = in ? in->server_tid : 0;

	span_close(t, resp, in, OBI_EV_SERVER_SPAN, OBI_EV_SERVER_RESP, tid);
	thread_unlink(tid, t);
	if (in)
		in->bits &= ~HS_READY;
}

/* What a parsed action means, for every parse state tc keeps: requests to a server
 * (ingress_conns, role server), responses to a client (ingress_conns, role client, HS_RESP)
 * and a server's responses (server_out, role server, HS_RESP). */
static __always_inline void seg_action(struct scratch *sc, struct http_state *st,
                                       struct ts_state *ts)
{
	struct pcur *p = &sc->pc;

	if (p->act == ACT_MSG_START) {
		st->start_ns = bpf_ktime_get_ns();
		return;
	}
	if (!(st->bits & HS_RESP)) {
		if (p->act == ACT_HDRS_END)
			server_req_done(sc, st, ts);
		return;
	}
	if (p->act != ACT_LINE0_END || st->status < 200) /* 1xx: the final response follows */
		return;
	if (st->role == OBI_ROLE_SERVER) {
		struct http_state *in = bpf_map_lookup_elem(&ingress_conns, &p->t);
		if (in && head_pop(in))
			st->bits |= HS_NOBODY;
		server_resp(&p->t, st, in);
	} else {
		if (head_pop(st))
			st->bits |= HS_NOBODY;
		span_close(&p->t, st, st, OBI_EV_CLIENT_SPAN, OBI_EV_CLIENT_RESP, 0);
	}
}

/* bpf_loop callback, both directions: one window or one action. */
static long seg_round(__u32 i, void *arg)
{
	struct parse_ctx *c = arg;
	struct http_state *st = c->st;
	struct scratch *sc = c->sc;

	int next = round_start(st, sc);
	if (next == ROUND_END)
		return 1;
	if (next == ROUND_LOAD && in_load(c->prog_ctx, sc))
		return 1; /* bytes unreadable: skip the rest of this segment */
	__u32 act = round_parse(c, &sc->pc);
	if (act == ACT_TS_NEED || !c->ts)
		return 1; /* the program makes the connection's ts_states entry first */
	if (act != ACT_NONE)
		seg_action(sc, st, c->ts);
	return 0;
}

struct seg {
	__u32 seq;
	__u32 payload_off;
	__u32 payload_len;
	__u8 syn, fin, rst, _pad0;
};

/* Parse L3/L4 headers into the tuple and the segment. local = this host's end: the
 * destination of an incoming segment, the source of an outgoing one (`out`). */
static __always_inline int parse_headers(struct __sk_buff *skb, struct obi_tuple *t, struct seg *s,
                                         int out)
{
	__u32 l4;
	__u32 l3_len;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
			return -1;
		if (ip.protocol != IPPROTO_TCP || ip.ihl < 5 || (ip.frag_off & bpf_htons(0x3fff)))
			return -1;
		t->family = OBI_AF_INET;
		__builtin_memcpy(t->local_addr, out ? &ip.saddr : &ip.daddr, 4);
		__builtin_memcpy(t->peer_addr, out ? &ip.daddr : &ip.saddr, 4);
		l4 = ETH_HLEN + ip.ihl * 4;
		l3_len = bpf_ntohs(ip.tot_len);
		if (l3_len == 0) /* BIG TCP GRO packets */
			l3_len = skb->len - ETH_HLEN;
		l3_len -= ip.ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)))
			return -1;
		if (ip6.nexthdr != IPPROTO_TCP) /* extension headers: not followed */
			return -1;
		t->family = OBI_AF_INET6;
		__builtin_memcpy(t->local_addr, out ? &ip6.saddr : &ip6.daddr, 16);
		__builtin_memcpy(t->peer_addr, out ? &ip6.daddr : &ip6.saddr, 16);
		l4 = ETH_HLEN + sizeof(ip6);
		l3_len = bpf_ntohs(ip6.payload_len);
		if (l3_len == 0)
			l3_len = skb->len - l4;
	} else {
		return -1;
	}
	struct tcphdr th;
	if (bpf_skb_load_bytes(skb, l4, &th, sizeof(th)))
		return -1;
	__u32 doff = th.doff * 4;
	if (doff < sizeof(th) || doff > l3_len)
		return -1;
	t->local_port = bpf_ntohs(out ? th.source : th.dest);
	t->peer_port = bpf_ntohs(out ? th.dest : th.source);
	s->seq = bpf_ntohl(th.seq);
	s->payload_off = l4 + doff;
	s->payload_len = l3_len - doff;
	if (s->payload_off + s->payload_len > skb->len)
		s->payload_len = skb->len > s->payload_off ? skb->len - s->payload_off : 0;
	s->syn = th.syn;
	s->fin = th.fin;
	s->rst = th.rst;
	return 0;
}

/* Follow the connection's bytes (one direction, state st) in sequence order: returns the
 * offset in this segment's payload of the first byte not seen before, or -1 if all of
 * them were (a retransmission). After missed bytes the framing is unknown: the parser
 * waits for a segment that starts a message. */
static __always_inline int seq_follow(struct http_state *st, const struct seg *s)
{
	__u32 start = 0;

	if (!st->seq_valid) {
		st->next_seq = s->seq;
		st->seq_valid = 1;
	}
	__s32 d = (__s32)(s->seq - st->next_seq);
	if (d < 0) {
		if ((__u32)(-d) >= s->payload_len)
			return -1;
		start = -d;
	} else if (d > 0) {
		count(OBI_CNT_SEQ_GAPS);
		if (st->phase != PH_TLS) {
			st->phase = PH_IDLE;
			st->bits |= HS_RESYNC;
		}
	}
	st->next_seq = s->seq + s->payload_len;
	return start;
}

/* Parse segment s's payload from offset `start` (bpf_loop of seg_round). */
/* The connection's ts_states entry (a server connection with one), else the stand-in. */
static __always_inline struct ts_state *ts_of(struct scratch *sc, struct http_state *st)
{
	struct ts_state *ts = 0;

	if (ts_collects(st))
		ts = bpf_map_lookup_elem(&ts_states, &sc->pc.t);
	if (ts)
		return ts;
	sc->ts_standin.standin = 1;
	return &sc->ts_standin;
}

/* A request with a tracestate on a connection without an entry (ACT_TS_NEED): make one. */
const volatile struct ts_state ts_zero; /* a reset entry (.rodata): too big to memset */

static __always_inline struct ts_state *ts_make(struct scratch *sc)
{
	bpf_map_update_elem(&ts_states, &sc->pc.t, (const void *)&ts_zero, BPF_NOEXIST);
	struct ts_state *ts = bpf_map_lookup_elem(&ts_states, &sc->pc.t);
	if (ts)
		return ts;
	count(OBI_CNT_TS_STATES_FULL);
	sc->ts_standin.standin = 2; /* collect nowhere, and do not ask again */
	return &sc->ts_standin;
}

/* Parse segment s's payload from offset `start` (bpf_loop of seg_round; once more after
 * making the connection's ts_states entry, if the parse stopped for it). */
static __always_inline void parse_payload(struct __sk_buff *skb, struct scratch *sc,
                                          struct http_state *st, const struct seg *s, __u32 start)
{
	struct pcur *p = &sc->pc;
	struct parse_ctx c = {.st = st, .sc = sc, .prog_ctx = skb, .ts = ts_of(sc, st)};

	p->pos = start;
	p->len = s->payload_len;
	p->payload_off = s->payload_off;
	p->win_len = 0;
	bpf_loop(MAX_ROUNDS, seg_round, &c, 0);
	if (p->act == ACT_TS_NEED) {
		c.ts = ts_make(sc);
		bpf_loop(MAX_ROUNDS, seg_round, &c, 0);
	}
}

#define TLS_HANDSHAKE 0x16
#define TLS_APPDATA 0x17

/* TLS connections (see the TLS turns comment in tpinjector.bpf.c): detect them on their first
 * bytes, open server requests, close client requests. Returns 1 if the segment was
 * handled here. `start`: offset of the first new byte in the payload. */
static __always_inline int tls_segment(struct __sk_buff *skb, struct scratch *sc,
                                       struct http_state *st, const struct seg *s, __u32 start)
{
	__u8 head[2] = {};

	if (st->phase != PH_TLS) {
		if (st->phase != PH_IDLE || st->start_ns || st->serial || start ||
		    bpf_skb_load_bytes(skb, s->payload_off, head, 2) || head[0] != TLS_HANDSHAKE ||
		    head[1] != 3)
			return 0;
		st->phase = PH_TLS;
		return 1;
	}
	if (st->role == OBI_ROLE_CLIENT) {
		if (!(st->bits & HS_READY))
			return 1;
		st->bits &= ~HS_READY;
		st->start_ns = bpf_ktime_get_ns();
		struct obi_event *ev = event_reserve();
		if (ev) {
			event_fill(ev, OBI_EV_CLIENT_RESP, st, &sc->pc.t, 0);
			ev->flags = OBI_EVF_TLS;
			bpf_ringbuf_submit(ev, 0);
		}
		return 1;
	}
	/* server: a new request starts with an application_data record at a turn */
	if ((st->bits & HS_READY) || start || bpf_skb_load_bytes(skb, s->payload_off, head, 2) ||
	    head[0] != TLS_APPDATA || head[1] != 3)
		return 1;
	st->start_ns = bpf_ktime_get_ns();
	new_trace_id(st->trace_id);
	__builtin_memset(st->parent_id, 0, 8);
	st->trace_flags = 0x03;
	new_span_id(st->span_id); /* sockops may replace trace and parent from kind 25 */
	st->bits = (st->bits & ~HS_TCPOPT) | HS_READY;
	st->serial++;
	count(OBI_CNT_SERVER_REQS);
	return 1;
}

/* The body of obi_tc_ingress once it holds the scratch slot. */
static __always_inline void tc_parse(struct __sk_buff *skb, struct scratch *sc)
{
	struct pcur *p = &sc->pc;
	__builtin_memset(p, 0, sizeof(*p));
	struct seg s = {};
	if (parse_headers(skb, &p->t, &s, 0))
		return;

	struct http_state *st = bpf_map_lookup_elem(&ingress_conns, &p->t);
	if (s.syn) {
		if (st) { /* a new connection on a reused tuple: forget the old one */
			bpf_map_delete_elem(&ingress_conns, &p->t);
			bpf_map_delete_elem(&ts_states, &p->t);
		}
		return;
	}
	if (!st) {
		if (!s.payload_len || s.rst || !port_selected(p->t.local_port))
			return;
		struct http_state *init = &sc->init;
		__builtin_memset(init, 0, sizeof(*init));
		init->role = OBI_ROLE_SERVER;
		bpf_map_update_elem(&ingress_conns, &p->t, init, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&ingress_conns, &p->t);
		if (!st)
			return;
	}
	if (s.payload_len && st->phase != PH_LOST) {
		int start = seq_follow(st, &s);
		if (start < 0)
			goto out;
		if (tls_segment(skb, sc, st, &s, start))
			goto out;
		parse_payload(skb, sc, st, &s, start);
	}
out:
	if (s.fin || s.rst) {
		span_abandon(&p->t);
		bpf_map_delete_elem(&ingress_conns, &p->t);
		bpf_map_delete_elem(&ts_states, &p->t);
		if (s.rst)
			bpf_map_delete_elem(&server_out, &p->t);
	}
}

/* Hook: tc ingress (tcx link or clsact direct-action filter). Context: __sk_buff at the
 * Ethernet header. Maps: server_ports (read), ingress_conns (create for new server
 * connections, update, delete on SYN/FIN/RST), scratch, events, counters.
 * Returns TC_ACT_OK always: parse misses never drop. */
SEC("tc")
int obi_tc_ingress(struct __sk_buff *skb)
{
	struct scratch *sc = scratch_get(SCRATCH_SOFTIRQ);

	if (!sc)
		return TC_ACT_OK; /* the connection's next segment sees a sequence gap: resync */
	tc_parse(skb, sc);
	scratch_put(sc);
	return TC_ACT_OK;
}

/* --- egress: the responses of server connections ------------------------------------ */

/* A TLS server's first data segment after a request turn (see TLS turns, tpinjector.bpf.c):
 * the request's event (with ids sockops may have read from kind 25) and its end. */
static __always_inline void tls_server_reply(const struct obi_tuple *t, struct http_state *in)
{
	struct obi_event *ev = event_reserve();

	if (ev) {
		event_fill(ev, OBI_EV_SERVER_REQ, in, t, 0);
		ev->flags = OBI_EVF_TLS | (in->bits & HS_TCPOPT ? OBI_EVF_TCPOPT : 0);
		bpf_ringbuf_submit(ev, 0);
	}
	ev = event_reserve();
	if (ev) {
		event_fill(ev, OBI_EV_SERVER_RESP, in, t, in->server_tid);
		ev->flags = OBI_EVF_TLS;
		ev->ts_ns = bpf_ktime_get_ns();
		bpf_ringbuf_submit(ev, 0);
	}
	in->bits &= ~(HS_READY | HS_TCPOPT);
	thread_unlink(in->server_tid, t);
}

/* The body of obi_tc_egress once it holds the scratch slot. */
static __always_inline void tc_out(struct __sk_buff *skb, struct scratch *sc)
{
	struct pcur *p = &sc->pc;
	__builtin_memset(p, 0, sizeof(*p));
	struct seg s = {};
	if (parse_headers(skb, &p->t, &s, 1))
		return;
	if (bpf_map_lookup_elem(&sock_release, &p->t)) {
		__u64 cookie = bpf_get_socket_cookie(skb); /* of skb->sk, the sending socket */
		if (cookie)
			bpf_map_delete_elem(&sock_hash, &cookie);
		bpf_map_delete_elem(&sock_release, &p->t);
		count(OBI_CNT_SOCKS_RELEASED);
	}
	if (s.syn) { /* SYN-ACK: a new connection, maybe on a reused tuple */
		bpf_map_delete_elem(&server_out, &p->t);
		return;
	}
	struct http_state *in = bpf_map_lookup_elem(&ingress_conns, &p->t);
	if (!s.payload_len || !in || in->role != OBI_ROLE_SERVER)
		goto out;
	if (in->phase == PH_TLS) {
		if (in->bits & HS_READY)
			tls_server_reply(&p->t, in);
		goto out;
	}
	struct http_state *st = bpf_map_lookup_elem(&server_out, &p->t);
	if (!st) {
		struct http_state *init = &sc->init;
		__builtin_memset(init, 0, sizeof(*init));
		init->role = OBI_ROLE_SERVER;
		init->bits = HS_RESP;
		bpf_map_update_elem(&server_out, &p->t, init, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&server_out, &p->t);
		if (!st)
			goto out;
	}
	if (st->phase == PH_LOST)
		goto out;
	int start = seq_follow(st, &s);
	if (start < 0)
		goto out;
	parse_payload(skb, sc, st, &s, start);
out:
	if (s.fin || s.rst)
		bpf_map_delete_elem(&server_out, &p->t);
}

/* Hook: tc egress (tcx link or clsact direct-action filter). Context: __sk_buff at the
 * Ethernet header, in whatever context the kernel transmits (the writing thread, or a
 * softirq clocked by ACKs). Maps: sock_release, sock_hash (delete released sockets),
 * ingress_conns (read; clear READY), server_out (create, update, delete on SYN/FIN/RST),
 * open_spans, thread_ctx (delete), scratch, events, counters. Returns TC_ACT_OK always. */
SEC("tc")
int obi_tc_egress(struct __sk_buff *skb)
{
	struct scratch *sc = scratch_get(SCRATCH_EGRESS);

	if (!sc)
		return TC_ACT_OK; /* the connection's next segment sees a sequence gap: resync */
	tc_out(skb, sc);
	scratch_put(sc);
	return TC_ACT_OK;
}
