/* SPDX-License-Identifier: GPL-2.0 */
/* Span events to userspace (struct obi_event, obi_abi.h): filling one from a message's parse
 * state, and the open span of a connection (map open_spans) from its request to its
 * response. obi/kernel/events.py is the reader. */
#ifndef OBI_EVENTS_H
#define OBI_EVENTS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "obi_abi.h"
#include "obi_http.h"
#include "obi_maps.h"

static __always_inline struct obi_event *event_reserve(void)
{
	struct obi_event *ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);

	if (!ev)
		count(OBI_CNT_EVENTS_LOST);
	return ev;
}

/* Fill an event from the parse state of the message it describes. */
static __always_inline void event_fill(struct obi_event *ev, __u32 kind,
                                       const struct http_state *st, const struct obi_tuple *t,
                                       __u64 pid_tgid)
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
	ev->tracestate_len = 0; /* set by the caller that has one (ev_set_tracestate) */
	__builtin_memcpy(ev->line, st->line, OBI_LINE_MAX);
	__builtin_memcpy(ev->tp, st->tp, OBI_TP_MAX);
	ev->tp_len = st->tp_len;
	ev->host_len = st->host_len;
	ev->_pad1 = 0;
	__builtin_memcpy(ev->host, st->host, OBI_HOST_MAX);
}

/* The event's tracestate: `len` bytes of `ts` (a normalized list, obi_tracestate.h). */
static __always_inline void ev_set_tracestate(struct obi_event *ev, const char *ts, __u32 len)
{
	__builtin_memcpy(ev->tracestate, ts, OBI_TRACESTATE_MAX);
	ev->tracestate_len = len > OBI_TRACESTATE_MAX ? 0 : len;
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
                                       struct http_state *conn, __u32 span_kind, __u32 resp_kind,
                                       __u64 pid_tgid)
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

#endif
