/* SPDX-License-Identifier: GPL-2.0 */
/* tracestate (W3C Trace Context) of the requests a server receives, validated and
 * normalized byte by byte as it arrives, so that the kernel path can pass it on in the
 * requests the server sends (tpinjector.bpf.c) and report it with the server span. The
 * rules are obi/w3c.py's (parse_tracestate, truncate_tracestate); a test runs both on the
 * same inputs (tests/integration/test_kernel_tracestate.py):
 *  - every tracestate header of the request, combined into one list in order;
 *  - members key=value, keys by the Level 1 grammar (simple, or tenant@system), values of
 *    1..256 printable characters; OWS around members and empty members are dropped;
 *  - an invalid member, a repeated key or more than 32 members drop the whole list;
 *  - at most TS_OUT_MAX (512) characters are passed on: when the list is longer, members
 *    above TS_LONG (128) characters go first, then members from the end, whole members only.
 * No raw copy is kept: members are stored in buf as they arrive. Until the list turns out
 * too long, buf holds exactly what is passed on. From then on (TSF_OVER) long members no
 * longer count and later ones are stored only while what counts still fits; buf has room
 * for TS_OUT_MAX bytes more than that, enough for the long members stored before, so a
 * member that should be kept is never cut for lack of room (ts_finish compacts). */
#ifndef OBI_TRACESTATE_H
#define OBI_TRACESTATE_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include "obi_abi.h"

#define TS_OUT_MAX OBI_TRACESTATE_MAX /* 512: what the spec asks vendors to pass on, at least */
#define TS_BUF 1024                   /* 2 * TS_OUT_MAX, see above */
#define TS_MEMBERS 32
#define TS_LONG 128
#define TS_KEY_MAX 256
#define TS_VALUE_MAX 256
#define TS_TENANT_MAX 241
#define TS_SYSTEM_MAX 14
#define TS_HDR_FIXED 14 /* "\ntracestate: " + "\r", around the value (tp_format's layout) */

/* ts_state.phase */
enum { TSP_SEP = 0, TSP_KEY, TSP_VAL, TSP_BAD };

/* ts_state.flags */
#define TSF_COPY (1u << 0)  /* the current member's bytes are being stored */
#define TSF_OVER (1u << 1)  /* the list is too long: members above TS_LONG no longer count */
#define TSF_STOP (1u << 2)  /* a member did not fit: it and every later member are dropped */
#define TSF_TAB (1u << 3)   /* a tab after the value: only OWS may follow in this member */
#define TSF_SYS (1u << 4)   /* the next key character starts the system id ('@' just seen) */
#define TSF_DIGIT (1u << 5) /* the key began with a digit (allowed for a tenant id only) */
#define TSF_NOFIT                                                                                  \
	(1u << 6) /* the current member does not fit: STOP at its end, unless it
			     * turns out longer than TS_LONG (then it is just skipped) */

/* The tracestate of a server connection's current request (map ts_states), or the per-CPU
 * stand-in (scratch) while the connection has no entry. */
struct ts_state {
	__u8 trace_id[16]; /* the server span it belongs to (set when the request's headers end) */
	__u8 span_id[8];
	__u32 hash[TS_MEMBERS]; /* FNV-1a of each member's key: a repeat drops the list */
	__u16 moff[TS_MEMBERS]; /* stored members: offset of the key in buf, */
	__u16 mlen[TS_MEMBERS]; /* and the length of key=value */
	__u32 khash;            /* FNV-1a of the current key */
	__u32 standin;          /* 1: the stand-in (no map entry yet); 2: no entry could be made */
	__u16 len;              /* bytes used in buf */
	__u16 logical;          /* formatted length of the stored members that count */
	__u16 nlogical;         /* and how many they are */
	__u16 lshort;           /* formatted length of the stored members up to TS_LONG, */
	__u16 nshort;           /* and how many they are (what counts once TSF_OVER is set) */
	__u16 klen;             /* current member: key length, */
	__u16 at;               /* key length before its '@' (0: none), */
	__u16 vlen;             /* value bytes so far, */
	__u16 vend;             /* value length up to its last non-space, */
	__u16 mstart;           /* offset in buf where its bytes (a comma first, if any) begin */
	__u16 out_len;          /* ts_finish: pass on buf[0..out_len) (0: nothing) */
	__u16 c_m, c_p, c_d;    /* ts_compact: member, position in it, destination */
	__u8 phase;             /* TSP_* */
	__u8 members;           /* list members seen */
	__u8 stored;            /* members in moff/mlen */
	__u8 flags;             /* TSF_* */
	char buf[TS_BUF];
};

#define FNV_BASIS 2166136261u
#define FNV_PRIME 16777619u

static __always_inline void ts_reset(struct ts_state *ts)
{
	__builtin_memset(ts->trace_id, 0, 16);
	__builtin_memset(ts->span_id, 0, 8);
	ts->len = 0;
	ts->logical = 0;
	ts->nlogical = 0;
	ts->lshort = 0;
	ts->nshort = 0;
	ts->out_len = 0;
	ts->phase = TSP_SEP;
	ts->members = 0;
	ts->stored = 0;
	ts->flags = 0;
}

static __always_inline void ts_bad(struct ts_state *ts)
{
	ts->phase = TSP_BAD;
	ts->flags &= ~TSF_COPY;
}

/* Stop storing the current member (it will not be passed on). */
static __always_inline void ts_drop_current(struct ts_state *ts)
{
	ts->len = ts->mstart;
	ts->flags &= ~TSF_COPY;
}

static __always_inline void ts_put(struct ts_state *ts, __u8 ch)
{
	if (!(ts->flags & TSF_COPY))
		return;
	if (ts->len >= TS_BUF) { /* only with runs of spaces inside values: drop it, and after */
		ts_drop_current(ts);
		ts->flags |= TSF_STOP;
		return;
	}
	ts->buf[ts->len & (TS_BUF - 1)] = ch;
	ts->len++;
}

/* The list turned out too long: from now on only members up to TS_LONG count. */
static __always_inline void ts_over(struct ts_state *ts)
{
	ts->flags |= TSF_OVER;
	ts->logical = ts->lshort;
	ts->nlogical = ts->nshort;
}

/* The current member is `cur` characters long so far: does it still fit what is passed
 * on? If not, apply the truncation rule (header comment). */
static __always_inline void ts_check(struct ts_state *ts, __u32 cur)
{
	if (!(ts->flags & TSF_COPY))
		return;
	if ((ts->flags & TSF_OVER) && cur > TS_LONG) {
		ts_drop_current(ts);
		return;
	}
	if (ts->logical + (ts->nlogical ? 1 : 0) + cur <= TS_OUT_MAX)
		return;
	if (!(ts->flags & TSF_OVER)) {
		ts_over(ts);
		if (cur > TS_LONG) {
			ts_drop_current(ts);
			return;
		}
		if (ts->logical + (ts->nlogical ? 1 : 0) + cur <= TS_OUT_MAX)
			return;
	}
	/* It does not fit. Whether that ends the list depends on its final length: a member
	 * that grows past TS_LONG is one of those removed first, and later ones may fit. */
	ts_drop_current(ts);
	ts->flags |= TSF_NOFIT;
}

static __always_inline int ts_keychar(__u8 c)
{
	return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
	       c == '*' || c == '/';
}

static __always_inline void ts_member_start(struct ts_state *ts, __u8 ch)
{
	if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9'))) {
		ts_bad(ts);
		return;
	}
	if (++ts->members > TS_MEMBERS) {
		ts_bad(ts);
		return;
	}
	ts->khash = (FNV_BASIS ^ ch) * FNV_PRIME;
	ts->klen = 1;
	ts->at = 0;
	ts->vlen = 0;
	ts->vend = 0;
	ts->flags &= ~(TSF_TAB | TSF_SYS | TSF_DIGIT | TSF_COPY | TSF_NOFIT);
	if (ch <= '9')
		ts->flags |= TSF_DIGIT;
	ts->phase = TSP_KEY;
	if (ts->flags & TSF_STOP)
		return;
	ts->flags |= TSF_COPY;
	ts->mstart = ts->len;
	if (ts->stored)
		ts_put(ts, ',');
	ts_put(ts, ch);
	ts_check(ts, 1);
}

/* bpf_loop callback of ts_key_end: is the key hash of member i the current key's? (A loop
 * of its own: compares unrolled in the parser multiplied its verification paths.) */
static long ts_dup_step(__u32 i, void *arg)
{
	struct ts_state *ts = *(struct ts_state **)arg;

	if (!ts || i >= TS_MEMBERS)
		return 1;
	__u64 k = i;
	asm volatile("%[k] &= 0x1f"
	             : [k] "+r"(k)); /* a bound the verifier sees (clang drops C masks) */
	if (ts->hash[k] == ts->khash) {
		ts->c_m = 1;
		return 1;
	}
	return 0;
}

/* '=' after a key: check the key as a whole, and that it is not a repeat. */
static __always_inline void ts_key_end(struct ts_state *ts)
{
	if (ts->at == 0) {
		if (ts->flags & TSF_DIGIT) { /* a simple key starts with a letter */
			ts_bad(ts);
			return;
		}
	} else if (ts->at > TS_TENANT_MAX || ts->klen - ts->at - 1 < 1 ||
	           ts->klen - ts->at - 1 > TS_SYSTEM_MAX) {
		ts_bad(ts);
		return;
	}
	__u32 n = ts->members - 1; /* this member's index (members <= TS_MEMBERS here) */
	struct ts_state *arg = ts;
	ts->c_m = 0; /* the scan's result: 1 if the key is a repeat */
	bpf_loop(n, ts_dup_step, &arg, 0);
	if (ts->c_m) {
		ts_bad(ts);
		return;
	}
	ts->hash[n & (TS_MEMBERS - 1)] = ts->khash;
	ts->phase = TSP_VAL;
	ts_put(ts, '=');
	ts_check(ts, ts->klen + 1);
}

/* ',' or the end of a header line after a value. */
static __always_inline void ts_member_end(struct ts_state *ts)
{
	if (ts->vend == 0) { /* an empty value */
		ts_bad(ts);
		return;
	}
	ts->phase = TSP_SEP;
	__u32 mlen = ts->klen + 1 + ts->vend;
	if ((ts->flags & TSF_NOFIT) && mlen <= TS_LONG)
		ts->flags |= TSF_STOP; /* a member that counts did not fit: it and all after go */
	if (!(ts->flags & TSF_COPY))
		return;
	__u32 key_at = ts->mstart + (ts->stored ? 1 : 0);
	ts->len = key_at + mlen; /* trailing spaces of the value are OWS: not kept */
	ts->moff[ts->stored & (TS_MEMBERS - 1)] = key_at;
	ts->mlen[ts->stored & (TS_MEMBERS - 1)] = mlen;
	ts->stored++;
	ts->logical += mlen + (ts->nlogical ? 1 : 0);
	ts->nlogical++;
	if (mlen <= TS_LONG) {
		ts->lshort += mlen + (ts->nshort ? 1 : 0);
		ts->nshort++;
	}
	ts->flags &= ~TSF_COPY;
}

/* One byte of a tracestate header's value (its leading OWS already skipped). */
static __always_inline void ts_feed(struct ts_state *ts, __u8 ch)
{
	switch (ts->phase) {
	case TSP_SEP:
		if (ch == ' ' || ch == '\t' || ch == ',')
			return; /* OWS and empty members */
		ts_member_start(ts, ch);
		return;
	case TSP_KEY:
		if (ch == '=') {
			ts_key_end(ts);
			return;
		}
		if (ch == '@') {
			if (ts->at) {
				ts_bad(ts);
				return;
			}
			ts->at = ts->klen;
			ts->flags |= TSF_SYS;
		} else if (!ts_keychar(ch)) {
			ts_bad(ts);
			return;
		} else if (ts->flags & TSF_SYS) {
			if (!(ch >= 'a' && ch <= 'z')) { /* a system id starts with a letter */
				ts_bad(ts);
				return;
			}
			ts->flags &= ~TSF_SYS;
		}
		if (++ts->klen > TS_KEY_MAX) {
			ts_bad(ts);
			return;
		}
		ts->khash = (ts->khash ^ ch) * FNV_PRIME;
		ts_put(ts, ch);
		ts_check(ts, ts->klen);
		return;
	case TSP_VAL:
		if (ch == ',') {
			ts_member_end(ts);
			return;
		}
		if (ch ==
		    '\t') { /* OWS after the value, or an invalid value: told by what follows */
			ts->flags |= TSF_TAB;
			return;
		}
		if (ch == ' ') {
			if (++ts->vlen <= TS_VALUE_MAX)
				ts_put(ts, ' ');
			return;
		}
		if (ch < 0x21 || ch > 0x7e || ch == '=' || (ts->flags & TSF_TAB)) {
			ts_bad(ts);
			return;
		}
		ts->vend = ++ts->vlen;
		if (ts->vend > TS_VALUE_MAX) {
			ts_bad(ts);
			return;
		}
		ts_put(ts, ch);
		ts_check(ts, ts->klen + 1 + ts->vend);
		return;
	}
}

/* The end of a tracestate header line: the list goes on in the next one, if any. */
static __always_inline void ts_header_end(struct ts_state *ts)
{
	if (ts->phase == TSP_KEY)
		ts_bad(ts); /* a key without '=' */
	else if (ts->phase == TSP_VAL)
		ts_member_end(ts);
}

/* The request's headers ended; `valid`: its traceparent was valid (otherwise, as the spec
 * says, the tracestate is not looked at). Sets out_len; returns 1 when members above
 * TS_LONG must first be compacted out of buf (ts_compact), else 0. */
static __always_inline int ts_finish(struct ts_state *ts, int valid)
{
	ts->out_len = 0;
	if (!valid || ts->phase == TSP_BAD || !ts->stored)
		return 0;
	if (!(ts->flags & TSF_OVER)) {
		ts->out_len = ts->len;
		return 0;
	}
	ts->c_m = 0;
	ts->c_p = 0;
	ts->c_d = 0;
	return 1;
}

/* bpf_loop callback of ts_compact: one byte of a member that is kept, or one member that
 * is not. Destination bytes never overtake the source (members only move left). */
static long ts_compact_step(__u32 i, void *arg)
{
	struct ts_state *ts = *(struct ts_state **)arg;

	if (!ts)
		return 1;
	__u32 m = ts->c_m;
	if (m >= ts->stored || m >= TS_MEMBERS)
		return 1;
	__u32 mlen = ts->mlen[m & (TS_MEMBERS - 1)];
	if (mlen > TS_LONG) {
		ts->c_m = m + 1;
		return 0;
	}
	__u32 d = ts->c_d, p = ts->c_p;
	if (p == 0 && d > 0) {
		ts->buf[d & (TS_BUF - 1)] = ',';
		ts->c_d = d + 1;
		d++;
	}
	__u32 src = ts->moff[m & (TS_MEMBERS - 1)] + p;
	ts->buf[d & (TS_BUF - 1)] = ts->buf[src & (TS_BUF - 1)];
	ts->c_d = d + 1;
	if (++p == mlen) {
		ts->c_m = m + 1;
		p = 0;
	}
	ts->c_p = p;
	return 0;
}

/* Drop the members above TS_LONG from buf, keeping the others in order; sets out_len. */
static __always_inline void ts_compact(struct ts_state *ts)
{
	struct ts_state *arg = ts;

	bpf_loop(TS_BUF + TS_MEMBERS * 2, ts_compact_step, &arg, 0);
	ts->out_len = ts->c_d > TS_OUT_MAX ? 0 : ts->c_d;
}

#endif
