/* SPDX-License-Identifier: GPL-2.0 */
/* Driving the HTTP parser (obi_http.h) over one message with bpf_loop. The program loads a
 * window of the message into scratch->buf; bpf_loop(parse_step) consumes it byte by byte
 * and stops (returns 1) when it needs the next window or when the program must act (ACT_*:
 * message start, start line end, headers end); the program handles the action and runs the
 * next round (round_start / round_parse). Used by sk_msg (tpinjector.bpf.c) and both tc
 * programs (tctracer.bpf.c). */
#ifndef OBI_PARSE_H
#define OBI_PARSE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "obi_abi.h"
#include "obi_http.h"
#include "obi_maps.h"

/* bpf_loop callback: consume bytes of the current window until an action, the end of the
 * window or the end of the message. */
static long parse_step(__u32 i, void *arg)
{
	struct parse_ctx *c = arg;
	struct http_state *st = c->st;
	struct scratch *sc = c->sc;
	__u32 act;

	if (!st || !sc)
		return 1;
	struct pcur *v = &sc->pc;
	if (v->pos >= v->len)
		return 1;
	switch (st->phase) {
	case PH_BODY:
	case PH_CHUNK_DATA: {
		__u64 avail = v->len - v->pos;
		__u64 n = st->body_left < avail ? st->body_left : avail;
		v->pos += n;
		st->body_left -= n;
		if (st->body_left == 0)
			st->phase = st->phase == PH_BODY ? PH_IDLE : PH_CHUNK_END;
		return 0;
	}
	case PH_LOST:
		v->pos = v->len;
		return 1;
	}
	if (v->pos < v->win_off || v->pos >= v->win_off + v->win_len)
		return 1; /* the program loads the next window */
	__u8 ch = sc->buf[(v->pos - v->win_off) & (WIN - 1)];

	if (st->phase == PH_IDLE) {
		/* A message starts here: requests begin with an uppercase method, responses
		 * with "HTTP/". Anything else is not HTTP/1.x. */
		if ((st->bits & HS_RESP) ? ch != 'H' : !(ch >= 'A' && ch <= 'Z')) {
			if (st->bits & HS_RESYNC) {
				v->pos = v->len; /* wait for a segment that starts a message */
				return 1;
			}
			act = set_lost(st);
			v->pos++;
			v->act = act;
			v->act_pos = v->pos;
			return 1;
		}
		msg_reset(st);
		if (c->ts && ts_collects(st))
			ts_reset(c->ts);
		st->phase = PH_LINE0;
		v->act = ACT_MSG_START;
		v->act_pos = v->pos;
		return 1; /* the byte itself is consumed by PH_LINE0 on the next step */
	}
	__u32 was_line0 = st->phase == PH_LINE0;
	act = http_feed(st, c->ts, ch);
	if (act == ACT_LOST && was_line0 && (st->bits & HS_RESYNC)) {
		st->phase = PH_IDLE; /* not a message start after all: keep waiting */
		v->pos = v->len;
		return 1;
	}
	v->pos++;
	if (act != ACT_NONE) {
		v->act = act;
		v->act_pos = v->pos;
		return 1;
	}
	return 0;
}

/* One round of bpf_loop(MAX_ROUNDS) over a message: round_start, then (ROUND_LOAD) the
 * program's own window load, then round_parse and the program's own action. */

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
