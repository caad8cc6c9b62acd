// SPDX-License-Identifier: GPL-2.0
/* Egress of instrumented processes: sockops puts the client (actively opened) TCP sockets
 * of the watched cgroup into sock_hash; sk_msg runs on every send of those sockets, in the
 * sender's context. Each HTTP/1.x request of a selected process gets
 * `Traceparent: 00-<trace>-<span>-<flags>\r\n` inserted right after its request line
 * (unless the request already has a traceparent header), and a CLIENT_REQ event.
 * Server sockets are not in sock_hash (obi_maps.h says why): tc egress (tctracer.bpf.c)
 * reads their responses on the wire.
 *
 * Inserting into the socket message, before TCP segments it, needs no sequence, checksum
 * or MSS work (docs/architecture.md, decision 2). Every path returns SK_PASS: telemetry never drops. */
#include <linux/bpf.h>
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

#define TLS_CCS 0x14
#define TLS_HANDSHAKE 0x16
#define TLS_APPDATA 0x17

/* --- TCP option kind 25 (docs/architecture.md, decision 3) --------------------------
 * Sender: sk_msg sets HS_OPT_PENDING (with the request's ids in egress_st) when a TLS
 * request starts; the next data segment the kernel builds for that socket reserves and
 * writes the option (HDR_OPT_LEN_CB / WRITE_HDR_OPT_CB), then the flag is cleared: one
 * segment per request. Only a segment that is not GSO and still fits the MSS with the
 * option gets it (a GSO packet would copy the option to every segment, and the MSS was
 * computed without it); otherwise the next data segment of the request is tagged.
 * Receiver: PARSE_HDR_OPT_CB (kernel saw an option it does not know) reads kind 25 and
 * gives its ids to the TLS request tc has just opened on that connection. */

static __always_inline __u32 tcpopt_len(const struct http_state *st)
{
	return st->trace_flags == 0x01 ? OBI_TCPOPT_LEN_SAMPLED : OBI_TCPOPT_LEN_FLAGS;
}

/* egress_st of a socket whose next data segment should carry the option, else NULL. */
static __always_inline struct http_state *tcpopt_pending(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;

	if (!sk || skops->skb_len == 0 || (skops->skb_tcp_flags & 0x02 /* SYN */))
		return 0;
	struct http_state *st = bpf_sk_storage_get(&egress_st, sk, 0, 0);
	if (!st || st->phase != PH_TLS) {
		/* Data went out and this socket is not a TLS client of a selected process:
		 * stop calling us for its segments. */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags &
		                                     ~BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
		return 0;
	}
	if (!(st->bits & HS_OPT_PENDING))
		return 0;
	if (skops->skb_len + 28 > skops->mss_cache)
		return 0; /* GSO, or no room under the MSS: tag a later segment */
	return st;
}

static __always_inline void tcpopt_reserve(struct bpf_sock_ops *skops)
{
	struct http_state *st = tcpopt_pending(skops);

	if (st)
		bpf_reserve_hdr_opt(skops, tcpopt_len(st), 0);
}

static __always_inline void tcpopt_write(struct bpf_sock_ops *skops)
{
	struct http_state *st = tcpopt_pending(skops);
	__u8 opt[28] = {};

	if (!st)
		return;
	__u32 len = tcpopt_len(st);
	opt[0] = OBI_TCPOPT_KIND;
	opt[1] = len;
	__builtin_memcpy(&opt[2], st->trace_id, 16);
	__builtin_memcpy(&opt[18], st->span_id, 8);
	opt[26] = st->trace_flags;
	if (bpf_store_hdr_opt(skops, opt,
	                      len == OBI_TCPOPT_LEN_SAMPLED ? OBI_TCPOPT_LEN_SAMPLED
	                                                    : OBI_TCPOPT_LEN_FLAGS,
	                      0) == 0) {
		st->bits &= ~HS_OPT_PENDING;
		count(OBI_CNT_TCPOPT_WRITTEN);
	}
}

static __always_inline void skops_tuple(struct bpf_sock_ops *skops, struct obi_tuple *t)
{
	t->local_port = skops->local_port;
	t->peer_port = ctx_remote_port(skops->remote_port);
	if (skops->family == OBI_AF_INET) {
		__u32 l = skops->local_ip4, r = skops->remote_ip4;
		t->family = OBI_AF_INET;
		__builtin_memcpy(t->local_addr, &l, 4);
		__builtin_memcpy(t->peer_addr, &r, 4);
	} else {
		__u32 l[4], r[4];
		l[0] = skops->local_ip6[0];
		l[1] = skops->local_ip6[1];
		l[2] = skops->local_ip6[2];
		l[3] = skops->local_ip6[3];
		r[0] = skops->remote_ip6[0];
		r[1] = skops->remote_ip6[1];
		r[2] = skops->remote_ip6[2];
		r[3] = skops->remote_ip6[3];
		tuple_set_addrs6(t, l, r);
	}
}

static __always_inline void tcpopt_parse(struct bpf_sock_ops *skops)
{
	__u8 opt[28] = {OBI_TCPOPT_KIND};

	if (!(obi_cfg_flags & OBI_CFG_TCP))
		return;
	long n = bpf_load_hdr_opt(skops, opt, sizeof(opt), 0);
	if (n != OBI_TCPOPT_LEN_SAMPLED && n != OBI_TCPOPT_LEN_FLAGS)
		return;
	if (opt[1] != n || is_zero(&opt[2], 16) || is_zero(&opt[18], 8))
		return;
	struct obi_tuple t = {};
	skops_tuple(skops, &t);
	struct http_state *in = bpf_map_lookup_elem(&ingress_conns, &t);
	/* Only the TLS request tc opened on this very segment (READY, no option yet). */
	if (!in || in->phase != PH_TLS || in->role != OBI_ROLE_SERVER || !(in->bits & HS_READY) ||
	    (in->bits & HS_TCPOPT))
		return;
	__builtin_memcpy(in->trace_id, &opt[2], 16);
	__builtin_memcpy(in->parent_id, &opt[18], 8);
	in->trace_flags = n == OBI_TCPOPT_LEN_FLAGS ? opt[26] : 0x01;
	in->bits |= HS_TCPOPT;
	count(OBI_CNT_TCPOPT_READ);
}

/* Hook: sockops on the watched cgroup (link). Context: bpf_sock_ops.
 * Maps: server_ports (read), sock_hash (write), egress_st (read: TLS option pending),
 * ingress_conns (write ids read from kind 25), counters.
 * Established sockets: active ones that a selected process connected are added to
 * sock_hash (their requests may need a header); no other socket is (a socket in a sockmap
 * reads and writes through the kernel's tcp_bpf code, obi_maps.h says what that risks);
 * passive ones never (tc egress follows their responses). With OBI_CFG_TCP, those active
 * sockets get the header-option write callbacks and passive ones on selected listening
 * ports the parse callback.
 * Returns 1 (the return value only matters for a few ops we do not handle). */
SEC("sockops")
int obi_sockops(struct bpf_sock_ops *skops)
{
	__u64 cookie;
	__u32 cb = 0;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB: {
		/* connect() runs in the connecting process (the established callback usually runs
		 * in a softirq, where the current task is anyone): mark sockets of selected
		 * processes; only those join sock_hash. */
		struct bpf_sock *sk = skops->sk;
		if (sk && tgid_selected())
			bpf_sk_storage_get(&egress_st, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		return 1;
	}
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: {
		struct bpf_sock *sk = skops->sk;
		if (!sk || !bpf_sk_storage_get(&egress_st, sk, 0, 0))
			return 1; /* not opened by a selected process: leave the socket alone */
		cb = BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
		break;
	}
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (!port_selected(skops->local_port))
			return 1;
		cb = BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG;
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
		tcpopt_reserve(skops);
		return 1;
	case BPF_SOCK_OPS_WRITE_HDR_OPT_CB:
		tcpopt_write(skops);
		return 1;
	case BPF_SOCK_OPS_PARSE_HDR_OPT_CB:
		tcpopt_parse(skops);
		return 1;
	default:
		return 1;
	}
	if (skops->family != OBI_AF_INET && skops->family != OBI_AF_INET6)
		return 1;
	if (obi_cfg_flags & OBI_CFG_TCP)
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | cb);
	if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1; /* server sockets stay out of sock_hash (obi_maps.h says why) */
	cookie = bpf_get_socket_cookie(skops);
	bpf_sock_hash_update(skops, &sock_hash, &cookie, BPF_NOEXIST);
	return 1;
}

static __always_inline void msg_tuple(struct sk_msg_md *msg, struct obi_tuple *t)
{
	t->local_port = msg->local_port;
	t->peer_port = ctx_remote_port(msg->remote_port);
	if (msg->family == OBI_AF_INET) {
		__u32 l = msg->local_ip4, r = msg->remote_ip4;
		t->family = OBI_AF_INET;
		__builtin_memcpy(t->local_addr, &l, 4);
		__builtin_memcpy(t->peer_addr, &r, 4);
	} else {
		__u32 l[4], r[4];
		l[0] = msg->local_ip6[0];
		l[1] = msg->local_ip6[1];
		l[2] = msg->local_ip6[2];
		l[3] = msg->local_ip6[3];
		r[0] = msg->remote_ip6[0];
		r[1] = msg->remote_ip6[1];
		r[2] = msg->remote_ip6[2];
		r[3] = msg->remote_ip6[3];
		tuple_set_addrs6(t, l, r);
	}
}

/* Copy message bytes [pos, pos+n) into the scratch window. */
static __always_inline int eg_load(struct sk_msg_md *msg, struct scratch *sc)
{
	struct pcur *p = &sc->pc;
	__u32 n = p->len - p->pos;

	if (n > WIN)
		n = WIN;
	if (bpf_msg_pull_data(msg, p->pos, p->pos + n, 0))
		return -1;
	void *d = (void *)(long)msg->data;
	void *e = (void *)(long)msg->data_end;
	if (d + 1 > e)
		return -1;
	__u64 avail = e - d;
	if (avail < n)
		n = avail;
	if (n == 0 || n > WIN)
		return -1;
	__u64 m = n;
	asm volatile("%[m] &= 0x7ff"
	             : [m] "+r"(m)); /* an explicit bound the verifier sees (clang drops C masks) */
	if (bpf_probe_read_kernel(sc->buf, m, d))
		return -1;
	p->win_off = p->pos;
	p->win_len = n;
	return 0;
}

/* A request's headers are complete (or the message ended inside them): report it. */
static __always_inline void client_req_event(struct scratch *sc, struct http_state *st, __u32 flags)
{
	struct obi_event *ev = event_reserve();

	if (!ev)
		return;
	event_fill(ev, OBI_EV_CLIENT_REQ, st, &sc->pc.t, sc->pc.pid_tgid);
	ev->flags = flags;
	bpf_ringbuf_submit(ev, 0);
}

/* Responses will come back on this connection: let tc parse them. */
static __always_inline void expect_responses(struct scratch *sc)
{
	struct http_state *in = bpf_map_lookup_elem(&ingress_conns, &sc->pc.t);

	if (in)
		return;
	struct http_state *init = &sc->init;
	__builtin_memset(init, 0, sizeof(*init));
	init->role = OBI_ROLE_CLIENT;
	init->bits = HS_RESP;
	bpf_map_update_elem(&ingress_conns, &sc->pc.t, init, BPF_NOEXIST);
}

/* bpf_loop context of ts_write_step. */
struct ts_write {
	struct sk_msg_md *msg;
	struct scratch *sc;
};

#define TS_NAME "\ntracestate: " /* 13 bytes, after the Traceparent header (tp_format) */
#define TS_NAME_LEN 13

/* One byte of the tracestate value, then the closing CR (the request line's LF follows). */
static long ts_write_step(__u32 i, void *arg)
{
	struct ts_write *w = arg;
	struct scratch *sc = w->sc;

	if (!sc || i > TS_OUT_MAX)
		return 1;
	__u64 k = i;
	asm volatile("%[k] &= 0x3ff" : [k] "+r"(k)); /* a bound the verifier sees (i <= 512) */
	char *d = (void *)(long)w->msg->data;
	char *e = (void *)(long)w->msg->data_end;
	char *q = d + OBI_TP_HDR_LEN + TS_NAME_LEN + k;
	asm volatile("" : "+r"(q)); /* check and store through this very pointer */
	if (q + 1 > e)
		return 1;
	*q = k < sc->ins.ts_len ? sc->ins.ts[k & (TS_OUT_MAX - 1)] : '\r';
	sc->ins.written = i + 1;
	return 0;
}

/* Insert the pending header(s) (sc->ins: Traceparent, and tracestate when ts_len) into the
 * message now, in one push. The cursor moves with the bytes after them, and the window is
 * reloaded. Returns 0 if they went in; otherwise the message is as it was (a push whose
 * bytes cannot be written is popped again: never zeros on the wire). */
static __always_inline int insert_pending(struct sk_msg_md *msg, struct scratch *sc)
{
	struct pcur *p = &sc->pc;
	__u32 off = sc->ins.off;
	__u32 tsl = sc->ins.ts_len;

	p->cur = 0;
	if (tsl > TS_OUT_MAX)
		tsl = 0;
	__u32 total = OBI_TP_HDR_LEN + (tsl ? TS_NAME_LEN + tsl + 1 : 0);
	if (bpf_msg_push_data(msg, off, total, 0)) {
		count(OBI_CNT_INSERT_FAILED);
		return -1;
	}
	if (bpf_msg_pull_data(msg, off, off + total, 0))
		goto undo;
	char *d = (void *)(long)msg->data;
	char *e = (void *)(long)msg->data_end;
	if (d + OBI_TP_HDR_LEN > e)
		goto undo;
	__builtin_memcpy(d, sc->ins.hdr, OBI_TP_HDR_LEN);
	if (tsl) {
		if (d + OBI_TP_HDR_LEN + TS_NAME_LEN > e)
			goto undo;
		__builtin_memcpy(d + OBI_TP_HDR_LEN, TS_NAME, TS_NAME_LEN);
		struct ts_write w = {.msg = msg, .sc = sc};
		sc->ins.written = 0;
		bpf_loop(tsl + 1, ts_write_step, &w, 0);
		if (sc->ins.written != tsl + 1)
			goto undo;
		count(OBI_CNT_TRACESTATE_INSERTED);
	}
	p->pushed += total;
	if (p->pos > off)
		p->pos += total;
	p->len += total;
	p->win_len = 0; /* the window holds the bytes as they were */
	count(OBI_CNT_HEADERS_INSERTED);
	return 0;
undo:
	bpf_msg_pop_data(msg, off, total, 0);
	count(OBI_CNT_INSERT_FAILED);
	return -1;
}

/* The tracestate the request being written passes on: that of the server request its
 * thread is serving (the ids say it is the same request), normalized (obi_tracestate.h).
 * Into sc->ins.ts / ts_len (0: none). */
static __always_inline void ins_tracestate(struct scratch *sc, const struct http_state *st)
{
	sc->ins.ts_len = 0;
	if (!(st->bits & HS_LINKED))
		return;
	struct thread_ctx *tc = bpf_map_lookup_elem(&thread_ctx, &sc->pc.pid_tgid);
	if (!tc)
		return;
	struct ts_state *ts = bpf_map_lookup_elem(&ts_states, &tc->conn);
	if (!ts || !ts->out_len || ts->out_len > TS_OUT_MAX ||
	    !bytes_eq(ts->trace_id, st->trace_id, 16) || !bytes_eq(ts->span_id, st->parent_id, 8))
		return;
	__builtin_memcpy(sc->ins.ts, ts->buf, TS_OUT_MAX);
	sc->ins.ts_len = ts->out_len;
}

static __always_inline void client_action(struct sk_msg_md *msg, struct scratch *sc,
                                          struct http_state *st)
{
	struct pcur *p = &sc->pc;

	switch (p->act) {
	case ACT_MSG_START: {
		struct thread_ctx *tc = bpf_map_lookup_elem(&thread_ctx, &p->pid_tgid);
		st->start_ns = bpf_ktime_get_ns();
		if (tc) {
			__builtin_memcpy(st->trace_id, tc->trace_id, 16);
			__builtin_memcpy(st->parent_id, tc->span_id, 8);
			st->trace_flags = tc->trace_flags;
			st->bits |= HS_LINKED;
		} else {
			new_trace_id(st->trace_id);
			__builtin_memset(st->parent_id, 0, 8);
			st->trace_flags =
			    0x03; /* sampled + random (W3C level 2): a fresh random id */
		}
		new_span_id(st->span_id);
		count(OBI_CNT_CLIENT_REQS);
		break;
	}
	case ACT_LINE0_END:
		/* The insertion point: the line's LF, which is in this message (tp_format). */
		if (obi_cfg_flags & OBI_CFG_HDR_INSERT) {
			sc->ins.off = p->act_pos - 1;
			tp_format(sc->ins.hdr, st->trace_id, st->span_id, st->trace_flags);
			ins_tracestate(sc, st);
			p->cur = 1;
		}
		break;
	case ACT_HDRS_END: {
		__u32 flags = st->bits & HS_LINKED ? OBI_EVF_THREAD_LINKED : 0;
		__u32 ts_in = 0; /* tracestate bytes inserted with it */
		if (st->tp_count) {
			/* The app wrote its own traceparent: leave the request as it is. */
			count(OBI_CNT_APP_TRACEPARENT);
			if (st->bits & HS_INJECTED)
				flags |=
				    OBI_EVF_INJECTED; /* too late: inserted with an earlier write */
			p->cur = 0;
		} else if (p->cur) {
			if (st->ts_count)
				sc->ins.ts_len = 0; /* the app wrote its own tracestate: add none */
			if (insert_pending(msg, sc) == 0) {
				flags |= OBI_EVF_INJECTED;
				ts_in = sc->ins.ts_len;
			}
		} else if (st->bits & HS_INJECTED) {
			flags |= OBI_EVF_INJECTED;
		}
		expect_responses(sc);
		struct http_state *in = bpf_map_lookup_elem(&ingress_conns, &p->t);
		if (in)
			head_push(in, st);
		event_fill(&sc->ev, OBI_EV_CLIENT_SPAN, st, &p->t, p->pid_tgid);
		if (ts_in)
			ev_set_tracestate(&sc->ev, sc->ins.ts, ts_in);
		sc->ev.flags = flags;
		span_open(sc, in, OBI_EV_CLIENT_REQ);
		break;
	}
	}
}

/* bpf_loop callback: one window or one action. */
static long eg_round(__u32 i, void *arg)
{
	struct parse_ctx *c = arg;
	struct http_state *st = c->st;
	struct scratch *sc = c->sc;

	int next = round_start(st, sc);
	if (next == ROUND_END)
		return 1;
	if (next == ROUND_LOAD && eg_load(c->prog_ctx, sc)) {
		st->phase = PH_LOST;
		count(OBI_CNT_PARSE_LOST);
		return 1;
	}
	if (round_parse(c, &sc->pc) != ACT_NONE)
		client_action(c->prog_ctx, sc, st);
	return 0;
}

/* --- TLS turns ----------------------------------------------------------------------
 * A connection whose first bytes are a TLS handshake record is never parsed as HTTP and
 * never written into. Its "requests" are turns: on a client socket, a write that begins
 * with an application_data record while no request is open opens one (CLIENT_REQ, and the
 * TCP option when enabled); the first bytes back from the server close it (tc,
 * CLIENT_RESP). On a server connection, tc opens a request on the first application_data
 * segment from the client while none is open; the server's next data segment closes it
 * (tc egress sends both events then, so that ids read from the option by sockops are
 * included).
 * Limits: a TLS 1.3 client without middlebox-compatibility CCS sends its Finished as an
 * application_data record (an extra short turn); a session ticket arriving after a
 * request closes that request's client span early; a request written in several writes
 * with replies in between counts as several. */

/* Record type and version major of the message's first bytes, or -1. */
static __always_inline int msg_head(struct sk_msg_md *msg, __u8 *type, __u8 *major)
{
	if (msg->size < 2 || bpf_msg_pull_data(msg, 0, 2, 0))
		return -1;
	__u8 *d = (void *)(long)msg->data;
	__u8 *e = (void *)(long)msg->data_end;
	if (d + 2 > e)
		return -1;
	*type = d[0];
	*major = d[1];
	return 0;
}

static __always_inline void tls_client_write(struct scratch *sc, struct http_state *st, __u8 type)
{
	struct pcur *p = &sc->pc;
	struct http_state *in = bpf_map_lookup_elem(&ingress_conns, &p->t);

	if (!in) {
		struct http_state *init = &sc->init;
		__builtin_memset(init, 0, sizeof(*init));
		init->role = OBI_ROLE_CLIENT;
		init->bits = HS_RESP;
		init->phase = PH_TLS;
		bpf_map_update_elem(&ingress_conns, &p->t, init, BPF_NOEXIST);
		in = bpf_map_lookup_elem(&ingress_conns, &p->t);
		if (!in)
			return;
	}
	if (type != TLS_APPDATA || (in->bits & HS_READY))
		return;
	struct thread_ctx *tc = bpf_map_lookup_elem(&thread_ctx, &p->pid_tgid);
	__u32 flags = OBI_EVF_TLS;
	st->start_ns = bpf_ktime_get_ns();
	if (tc) {
		__builtin_memcpy(st->trace_id, tc->trace_id, 16);
		__builtin_memcpy(st->parent_id, tc->span_id, 8);
		st->trace_flags = tc->trace_flags;
		flags |= OBI_EVF_THREAD_LINKED;
	} else {
		new_trace_id(st->trace_id);
		__builtin_memset(st->parent_id, 0, 8);
		st->trace_flags = 0x03;
	}
	new_span_id(st->span_id);
	if (obi_cfg_flags & OBI_CFG_TCP) {
		st->bits |= HS_OPT_PENDING;
		flags |= OBI_EVF_TCPOPT;
	}
	in->bits |= HS_READY;
	count(OBI_CNT_CLIENT_REQS);
	client_req_event(sc, st, flags);
}

/* A write on a TLS connection (or the first write of a connection: is it TLS?).
 * Returns 1 if the message was handled here (TLS), 0 to parse it as HTTP. */
static __always_inline int tls_write(struct sk_msg_md *msg, struct http_state *st,
                                     struct scratch *sc)
{
	__u8 type = 0, major = 0;

	if (st->phase != PH_TLS) {
		if (st->phase != PH_IDLE || st->start_ns || msg_head(msg, &type, &major) ||
		    type != TLS_HANDSHAKE || major != 3)
			return 0;
		st->phase = PH_TLS;
	} else if (msg_head(msg, &type, &major)) {
		return 1;
	}
	tls_client_write(sc, st, type);
	return 1;
}

/* --- sends sk_msg did not see -------------------------------------------------------
 * The kernel gives one sendmsg to sk_msg in pieces (an sk_msg holds a bounded number of
 * scatterlist entries: ~540 KiB here). When pushing a piece to TCP stops half way (a
 * non-blocking socket, e.g. any Python socket with a timeout, whose send buffer filled),
 * the kernel frees the rest of the piece, send() returns a short count, and the verdict
 * stays "pass" (tcp_bpf_send_verdict resets psock->eval only after a complete push). The
 * application then writes the rest again and that next sendmsg (up to one piece of it) goes
 * out WITHOUT running this program. So a body written in one large send could leave the
 * parser with body bytes still to skip that had in fact gone out: it took the next request
 * for body (no header, no span). The socket's write_seq tells what TCP really took: after
 * each message we note where write_seq should be at the next one, and bytes taken beyond
 * that (never seen) are skipped from the body we are in (a chunk's data and its CRLF).
 * Anything else (unseen headers, or seen bytes TCP never took) cannot be followed: the
 * connection is given up, never guessed. */

/* Only write_seq is read: CO-RE relocates the offset against the running kernel's BTF. */
struct tcp_sock {
	__u32 write_seq;
} __attribute__((preserve_access_index));

static __always_inline int sock_write_seq(struct sk_msg_md *msg, __u32 *seq)
{
	struct bpf_sock *sk = msg->sk;

	if (!sk)
		return -1;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return -1;
	*seq = tp->write_seq;
	return 0;
}

/* Before parsing: bring the parser to write_seq. Returns -1 if the position is lost. */
static __always_inline int send_resync(struct http_state *st, __u32 seq)
{
	if (!st->seq_valid || seq == st->next_seq)
		return 0;
	__s32 d = (__s32)(seq - st->next_seq); /* > 0: bytes that went out unseen */
	count(OBI_CNT_UNSEEN_SENDS);
	if (d <= 0 || (st->phase != PH_BODY && st->phase != PH_CHUNK_DATA))
		return -1;
	if ((__u64)d <= st->body_left) {
		st->body_left -= d;
		if (st->body_left == 0)
			st->phase = st->phase == PH_BODY ? PH_IDLE : PH_CHUNK_END;
		return 0;
	}
	if (st->phase == PH_CHUNK_DATA && (__u64)d == st->body_left + 2) {
		/* the rest of the chunk and its CRLF (a writer sending chunk by chunk) */
		st->body_left = 0;
		st->line_len = 0;
		st->phase = PH_CHUNK_SZ;
		return 0;
	}
	return -1;
}

/* After parsing (and inserting): where write_seq will be if TCP takes all of it. */
static __always_inline void send_note(struct sk_msg_md *msg, struct http_state *st, __u32 seq)
{
	st->next_seq = seq + msg->size;
	st->seq_valid = 1;
}

/* The body of obi_sk_msg once it holds the scratch slot. */
static __always_inline void sk_msg_parse(struct sk_msg_md *msg, struct http_state *st,
                                         struct scratch *sc)
{
	struct pcur *p = &sc->pc;
	__builtin_memset(p, 0, sizeof(*p));
	p->len = msg->size;
	p->pid_tgid = bpf_get_current_pid_tgid();
	msg_tuple(msg, &p->t);
	if (tls_write(msg, st, sc))
		return;
	__u32 seq = 0;
	int have_seq = sock_write_seq(msg, &seq) == 0;
	if (!have_seq) {
		st->seq_valid = 0;
	} else if (send_resync(st, seq)) {
		st->phase = PH_LOST;
		count(OBI_CNT_PARSE_LOST);
		return;
	}
	struct parse_ctx c = {.st = st, .sc = sc, .prog_ctx = msg, .ts = &sc->ts_standin};

	bpf_loop(MAX_ROUNDS, eg_round, &c, 0);
	if (p->pos < p->len && st->phase != PH_LOST) {
		st->phase = PH_LOST; /* out of rounds: stop rather than guess */
		count(OBI_CNT_PARSE_LOST);
	}
	/* The headers continue in a later write: insert now (an application's own traceparent
	 * in that later write would make two; README, Limitations). */
	if (p->cur && st->phase != PH_LOST && insert_pending(msg, sc) == 0)
		st->bits |= HS_INJECTED;
	if (have_seq)
		send_note(msg, st, seq);
}

/* Hook: sk_msg verdict on sock_hash. Context: sk_msg_md of one sendmsg (or part of it),
 * running in the sending thread. Maps: selected_tgids, thread_ctx (read), egress_st
 * (socket storage), ingress_conns (create for client connections), sock_release (insert
 * when the socket is given up), scratch, events, counters.
 * Returns SK_PASS always. */
SEC("sk_msg")
int obi_sk_msg(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;

	if (!sk || !tgid_selected())
		return SK_PASS;
	struct http_state *st = bpf_sk_storage_get(&egress_st, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return SK_PASS;
	st->role = OBI_ROLE_CLIENT; /* only client sockets are in sock_hash */
	if (st->phase == PH_LOST)
		return SK_PASS;
	struct scratch *sc = scratch_get(SCRATCH_PROC);
	if (sc) {
		sk_msg_parse(msg, st, sc);
		scratch_put(sc);
	} else {
		/* Cannot parse this message: never guess the framing of the next one. */
		st->phase = PH_LOST;
	}
	if (st->phase == PH_LOST) {
		/* Nothing more to do for this socket: let tc take it out of sock_hash. */
		struct obi_tuple t = {};
		__u32 one = 1;
		msg_tuple(msg, &t);
		bpf_map_update_elem(&sock_release, &t, &one, BPF_ANY);
	}
	return SK_PASS;
}
