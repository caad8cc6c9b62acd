/* SPDX-License-Identifier: GPL-2.0 */
/* HTTP/1.x stream parser shared by sk_msg (what a process writes) and tc ingress (what
 * arrives). It is a byte-level state machine whose state lives in a map value per
 * connection and direction, so messages may be cut anywhere (requests split over writes,
 * headers over segments) and bodies are skipped by arithmetic (Content-Length and chunked
 * framing), never scanned: a body can never be taken for a request start.
 *
 * Driving: the program loads a window of the message into scratch->buf and runs
 * bpf_loop(parse_step). parse_step stops (returns 1) when it needs the next window or when
 * the program must act (ACT_*: message start, start line end, headers end); the program
 * handles the action and loops again (round_start/round_parse in obi_maps.h).
 * Nothing here reads outside the bytes of the current message. */
#ifndef OBI_HTTP_H
#define OBI_HTTP_H

#include <linux/types.h>
#include "obi_abi.h"

#define WIN 1024 /* window size; a power of two (index masking) */
#define MAX_INS 4 /* header insertions per sk_msg message (pipelined requests) */
#define MAX_ROUNDS 256 /* windows + actions per message; beyond: give the connection up */

/* http_state.phase */
enum {
	PH_IDLE = 0,   /* at a message boundary */
	PH_LINE0,      /* in the request/status line */
	PH_HDRS,       /* in the header block */
	PH_BODY,       /* body_left bytes of a Content-Length body */
	PH_CHUNK_SZ,   /* chunk-size digits */
	PH_CHUNK_EXT,  /* rest of the chunk-size line */
	PH_CHUNK_DATA, /* body_left bytes of chunk data */
	PH_CHUNK_END,  /* CRLF after chunk data */
	PH_TRAILER,    /* trailer fields after the last chunk */
	PH_LOST,       /* not HTTP/1.x (or framing we do not follow): leave the stream alone */
	PH_TLS,        /* TLS records (the connection began with a handshake): never parsed as
			* HTTP, never written into; requests are turns (see egress.bpf.c) */
};

/* actions for the program */
enum { ACT_NONE = 0, ACT_MSG_START, ACT_LINE0_END, ACT_HDRS_END, ACT_LOST };

/* http_state.bits */
#define HS_RESP (1u << 0)        /* this direction carries responses (else requests) */
#define HS_METHOD_DONE (1u << 1) /* saw the SP after the method */
#define HS_HAS_CL (1u << 2)
#define HS_CHUNKED (1u << 3)
#define HS_READY (1u << 4)       /* server request parsed: its ids may be linked to a thread */
#define HS_RESYNC (1u << 5)      /* tc: after a sequence gap, wait for a segment starting a message */
#define HS_INJECTED (1u << 6)    /* sk_msg: header inserted for the current request */
#define HS_LINKED (1u << 7)      /* ids came from the thread's server request */
#define HS_TP_VALID (1u << 8)
#define HS_OPT_PENDING (1u << 9) /* egress TLS: the next data segment carries TCP option kind 25 */
#define HS_TCPOPT (1u << 10)     /* ingress TLS: the open request's ids came from kind 25 */

/* candidate header names (bit k of hmask) */
#define H_CL 1
#define H_TE 2
#define H_TP 4
#define H_TS 8
#define H_HOST 16
#define H_ALL (H_CL | H_TE | H_TP | H_TS | H_HOST)

/* Parse state of one direction of one connection. Internal (never read by userspace). */
struct http_state {
	__u64 body_left; /* bytes left in the body / current chunk */
	__u64 cl;        /* Content-Length value being read */
	__u64 last8;     /* last 8 bytes of the start line (CR excluded): version check */
	__u64 start_ns;  /* time the current message started */
	__u64 server_tid; /* server connections: pid_tgid of the thread that read the current
			   * request (thread hook), the thread of the server span */
	__u32 phase;
	__u32 role;      /* OBI_ROLE_* of the instrumented process on this connection */
	__u32 bits;      /* HS_* */
	__u32 line_len;  /* bytes of the current line (CR excluded), saturating */
	__u32 hmask;     /* candidate names still matching the current header name */
	__u32 hcur;      /* H_* whose value we are in, 0 if none */
	__u32 vlen;      /* value bytes after leading OWS */
	__u32 vend;      /* vlen at the last non-OWS byte */
	__u32 te_idx;    /* chars of "chunked" matched */
	__u32 next_seq;  /* tc: next expected TCP sequence number;
			  * sk_msg: the socket's write_seq expected at the next send */
	__u32 seq_valid; /* next_seq is set */
	__u32 serial;    /* requests seen on this connection */
	__u32 queued;    /* requests of this connection sent as *_REQ events whose response is
			  * not seen yet (kept in the connection's ingress_conns state) */
	__u32 _pad2;
	__u16 tp_count;
	__u16 ts_count;
	__u16 tp_len;    /* significant length of the first traceparent value */
	__u16 ts_len;
	__u16 line_cap;  /* bytes kept in line[] */
	__u16 status;
	__u16 host_count;
	__u16 host_len;  /* bytes of the first Host value (0 if longer than OBI_HOST_MAX) */
	__u8 trace_id[16];
	__u8 span_id[8];
	__u8 parent_id[8];
	__u8 trace_flags;
	__u8 _pad0[7];
	char line[OBI_LINE_MAX];
	char tp[OBI_TP_MAX];
	char tracestate[OBI_TRACESTATE_MAX];
	char host[OBI_HOST_MAX];
};

/* The server request a thread is serving (map thread_ctx). */
/* bpf_loop context: only pointers, which stay the same for the whole program run. */
struct parse_ctx {
	struct http_state *st;
	struct scratch *sc;
	void *prog_ctx; /* __sk_buff or sk_msg_md */
};

struct thread_ctx {
	struct obi_tuple conn; /* the server connection it came on */
	__u8 trace_id[16];
	__u8 span_id[8]; /* the server span's id: parent of the thread's client spans */
	__u8 trace_flags;
	__u8 _pad0[7];
};

/* One pending header insertion of an sk_msg message. */
struct ins {
	__u32 off; /* message offset (before any insertion) right after the request line */
	__u32 ok;  /* still wanted (no traceparent found in the same request) */
	char hdr[72]; /* "Traceparent: 00-...-..-..\r\n", OBI_TP_HDR_LEN bytes used */
};

/* Cursor of the message being parsed. Kept in the per-CPU scratch map, not on the stack:
 * the verifier does not track map contents, so bpf_loop callbacks that advance it converge
 * at once instead of being explored for every value. */
struct pcur {
	__u32 pos;     /* message offset of the next byte */
	__u32 len;     /* message length */
	__u32 win_off; /* message offset of buf[0] */
	__u32 win_len; /* bytes valid in buf */
	__u32 act;     /* ACT_* to handle */
	__u32 act_pos; /* message offset right after the byte that raised act */
	__u32 nins;    /* sk_msg: insertions recorded in ins[] */
	__u32 cur;     /* sk_msg: 1 + index in ins[] of the request whose headers are open */
	__u64 pid_tgid;
	struct obi_tuple t; /* the connection, seen from this host */
};

struct scratch {
	__u64 busy; /* > 1: another program on this CPU is using this slot (see scratch_get) */
	struct pcur pc;
	__u8 buf[2 * WIN]; /* WIN used; sized so that a 0x7ff-masked length is in bounds */
	struct http_state init; /* zeroed template for new map entries */
	struct ins ins[MAX_INS];
	struct obi_event ev; /* a request's event being built for open_spans */
};


static __always_inline __u8 lower(__u8 c)
{
	return (c >= 'A' && c <= 'Z') ? c + 32 : c;
}

/* Globals, not `static const` strings: clang 14 puts those in mergeable string sections
 * that its BTF describes wrongly (the kernel then rejects the object's BTF). */
#define NAME_CL_LEN 14
#define NAME_TE_LEN 17
#define NAME_TP_LEN 11
#define NAME_TS_LEN 10
#define NAME_HOST_LEN 4
#define CHUNKED_LEN 7
const volatile char name_cl[32] = "content-length";
const volatile char name_te[32] = "transfer-encoding";
const volatile char name_tp[32] = "traceparent";
const volatile char name_ts[32] = "tracestate";
const volatile char name_host[32] = "host";
const volatile char word_chunked[8] = "chunked";

/* Clear the per-message fields before a message starts. */
static __always_inline void msg_reset(struct http_state *st)
{
	st->bits &= HS_RESP | HS_RESYNC;
	st->line_len = 0;
	st->line_cap = 0;
	st->last8 = 0;
	st->hmask = 0;
	st->hcur = 0;
	st->vlen = 0;
	st->vend = 0;
	st->te_idx = 0;
	st->cl = 0;
	st->body_left = 0;
	st->tp_count = 0;
	st->ts_count = 0;
	st->tp_len = 0;
	st->ts_len = 0;
	st->host_count = 0;
	st->host_len = 0;
	st->status = 0;
}

static __always_inline void line_reset(struct http_state *st)
{
	st->line_len = 0;
	st->hmask = H_ALL;
	st->hcur = 0;
	st->vlen = 0;
	st->vend = 0;
	st->te_idx = 0;
}

static __always_inline __u32 set_lost(struct http_state *st)
{
	st->phase = PH_LOST;
	return ACT_LOST;
}

/* Narrow candidate k (bit) by the byte at name position idx. */
static __always_inline void name_match(struct http_state *st, __u32 bit, const volatile char *name, __u32 nlen,
				       __u32 idx, __u8 lc)
{
	if (!(st->hmask & bit))
		return;
	if (idx >= nlen || (__u8)name[idx & 31] != lc)
		st->hmask &= ~bit;
}

/* End of the header block: pick the body framing. */
static __always_inline void headers_end(struct http_state *st)
{
	__u32 status = st->status;

	st->body_left = 0;
	if (st->bits & HS_RESP) {
		if (status == 101) { /* protocol switch: no longer HTTP/1.x */
			st->phase = PH_LOST;
			return;
		}
		if ((status >= 100 && status < 200) || status == 204 || status == 304) {
			st->phase = PH_IDLE;
			return;
		}
	}
	if (st->bits & HS_CHUNKED) {
		st->phase = PH_CHUNK_SZ;
		st->line_len = 0;
	} else if (st->bits & HS_HAS_CL) {
		st->body_left = st->cl;
		st->phase = st->cl ? PH_BODY : PH_IDLE;
	} else if (st->bits & HS_RESP) {
		st->phase = PH_LOST; /* delimited by close: nothing more to frame */
	} else {
		st->phase = PH_IDLE; /* request without body */
	}
}

/* End of the start line: check it is HTTP/1.x. */
static __always_inline __u32 line0_end(struct http_state *st)
{
	if (st->bits & HS_RESP) {
		/* "HTTP/1.x NNN" */
		if (st->line_cap < 12 || st->line[0] != 'H' || st->line[1] != 'T' || st->line[2] != 'T' ||
		    st->line[3] != 'P' || st->line[4] != '/' || st->line[5] != '1' || st->line[6] != '.' ||
		    st->line[8] != ' ')
			return set_lost(st);
		__u8 a = st->line[9], b = st->line[10], c = st->line[11];
		if (a < '1' || a > '5' || b < '0' || b > '9' || c < '0' || c > '9')
			return set_lost(st);
		st->status = (a - '0') * 100 + (b - '0') * 10 + (c - '0');
	} else {
		/* method SP target SP "HTTP/1.0" | "HTTP/1.1" (big-endian in last8) */
		if (!(st->bits & HS_METHOD_DONE) ||
		    (st->last8 != 0x485454502f312e31ULL && st->last8 != 0x485454502f312e30ULL))
			return set_lost(st);
	}
	st->bits &= ~HS_RESYNC;
	st->phase = PH_HDRS;
	line_reset(st);
	return ACT_LINE0_END;
}

static __always_inline __u32 byte_line0(struct http_state *st, __u8 ch)
{
	if (ch == '\n')
		return line0_end(st);
	if (ch == '\r')
		return ACT_NONE;
	if (st->line_cap < OBI_LINE_MAX) {
		st->line[st->line_cap & 127] = ch; /* mask for the verifier; line_cap < 96 */
		st->line_cap++;
	}
	st->last8 = (st->last8 << 8) | ch;
	if (!(st->bits & (HS_RESP | HS_METHOD_DONE))) {
		if (ch == ' ') {
			if (st->line_len == 0)
				return set_lost(st);
			st->bits |= HS_METHOD_DONE;
		} else if (!((ch >= 'A' && ch <= 'Z') || ch == '-' || ch == '_') || st->line_len > 24) {
			return set_lost(st);
		}
	}
	if (st->line_len < 0xffff)
		st->line_len++;
	return ACT_NONE;
}

static __always_inline __u32 byte_hdrs(struct http_state *st, __u8 ch)
{
	if (ch == '\n') {
		if (st->line_len == 0) {
			headers_end(st);
			return ACT_HDRS_END;
		}
		if (st->hcur == H_TP && st->tp_count == 1)
			st->tp_len = st->vend > 0xffff ? 0xffff : st->vend;
		if (st->hcur == H_TS && st->ts_count == 1)
			st->ts_len = st->vend > OBI_TRACESTATE_MAX ? OBI_TRACESTATE_MAX : st->vend;
		if (st->hcur == H_HOST && st->host_count == 1)
			st->host_len = st->vend > OBI_HOST_MAX ? 0 : st->vend; /* cut would be wrong: drop */
		line_reset(st);
		return ACT_NONE;
	}
	if (ch == '\r')
		return ACT_NONE;
	__u8 lc = lower(ch);
	if (!st->hcur && st->hmask) {
		/* in the name (hcur==0 after ':' means another header: nothing to do) */
		if (ch == ':') {
			__u32 n = st->line_len;
			if ((st->hmask & H_CL) && n == NAME_CL_LEN)
				st->hcur = H_CL;
			else if ((st->hmask & H_TE) && n == NAME_TE_LEN)
				st->hcur = H_TE;
			else if ((st->hmask & H_TP) && n == NAME_TP_LEN)
				st->hcur = H_TP;
			else if ((st->hmask & H_TS) && n == NAME_TS_LEN)
				st->hcur = H_TS;
			else if ((st->hmask & H_HOST) && n == NAME_HOST_LEN)
				st->hcur = H_HOST;
			st->hmask = 0;
			if (st->hcur == H_TP)
				st->tp_count++;
			if (st->hcur == H_TS)
				st->ts_count++;
			if (st->hcur == H_HOST)
				st->host_count++;
			if (st->hcur == H_CL) {
				st->bits |= HS_HAS_CL; /* a repeated Content-Length restarts the value */
				st->cl = 0;
			}
		} else {
			__u32 idx = st->line_len;
			name_match(st, H_CL, name_cl, NAME_CL_LEN, idx, lc);
			name_match(st, H_TE, name_te, NAME_TE_LEN, idx, lc);
			name_match(st, H_TP, name_tp, NAME_TP_LEN, idx, lc);
			name_match(st, H_TS, name_ts, NAME_TS_LEN, idx, lc);
			name_match(st, H_HOST, name_host, NAME_HOST_LEN, idx, lc);
		}
	} else if (st->hcur) {
		int ows = ch == ' ' || ch == '\t';
		if (ows && st->vlen == 0)
			goto out; /* leading OWS */
		__u32 v = st->vlen;
		switch (st->hcur) {
		case H_CL:
			if (ch >= '0' && ch <= '9') {
				if (st->cl > (1ULL << 50))
					return set_lost(st);
				st->cl = st->cl * 10 + (ch - '0');
			} else if (!ows) {
				return set_lost(st); /* bad or listed Content-Length: don't guess */
			}
			break;
		case H_TE:
			if (lc == (__u8)word_chunked[st->te_idx & 7]) {
				st->te_idx++;
				if (st->te_idx == CHUNKED_LEN) {
					st->bits |= HS_CHUNKED;
					st->te_idx = 0;
				}
			} else {
				st->te_idx = lc == 'c' ? 1 : 0;
			}
			break;
		case H_TP:
			if (st->tp_count == 1 && v < OBI_TP_MAX)
				st->tp[v & 63] = ch;
			break;
		case H_TS:
			if (st->ts_count == 1 && v < OBI_TRACESTATE_MAX)
				st->tracestate[v & (OBI_TRACESTATE_MAX - 1)] = ch;
			break;
		case H_HOST:
			if (st->host_count == 1 && v < OBI_HOST_MAX)
				st->host[v & (OBI_HOST_MAX - 1)] = ch;
			break;
		}
		st->vlen = v + 1;
		if (!ows)
			st->vend = st->vlen;
	}
out:
	if (st->line_len < 0xffff)
		st->line_len++;
	return ACT_NONE;
}

/* Hex digits, indexed by the byte: HEX_DIGIT | value for a digit, 0 for anything else.
 * Tables in .rodata: decoding a digit is one load, not two or three branches. Branches per
 * digit multiply the paths the verifier walks (the 55 digits of a traceparent took it past
 * 1,000,000 instructions on some builds of 6.18). hex_lc: lowercase only (W3C HEXDIGLC);
 * hex_any: both cases (chunk sizes). */
#define HEX_DIGIT 0x10
#define HEX_DIGITS_LC                                                                                  \
	['0'] = 0x10, ['1'] = 0x11, ['2'] = 0x12, ['3'] = 0x13, ['4'] = 0x14, ['5'] = 0x15, ['6'] = 0x16, \
	['7'] = 0x17, ['8'] = 0x18, ['9'] = 0x19, ['a'] = 0x1a, ['b'] = 0x1b, ['c'] = 0x1c, ['d'] = 0x1d, \
	['e'] = 0x1e, ['f'] = 0x1f
const volatile __u8 hex_lc[256] = { HEX_DIGITS_LC };
const volatile __u8 hex_any[256] = {
	HEX_DIGITS_LC,
	['A'] = 0x1a, ['B'] = 0x1b, ['C'] = 0x1c, ['D'] = 0x1d, ['E'] = 0x1e, ['F'] = 0x1f,
};

static __always_inline __u32 byte_chunk(struct http_state *st, __u8 ch)
{
	switch (st->phase) {
	case PH_CHUNK_SZ: {
		__u8 v = hex_any[ch];
		if (v & HEX_DIGIT) {
			if (st->body_left > (1ULL << 40))
				return set_lost(st);
			st->body_left = st->body_left * 16 + (v & 0xf);
			st->line_len++;
			return ACT_NONE;
		}
		if (ch == ';' || ch == ' ' || ch == '\t') {
			st->phase = PH_CHUNK_EXT;
			return ACT_NONE;
		}
		if (ch == '\r')
			return ACT_NONE;
		if (ch != '\n')
			return set_lost(st);
	}
		/* fallthrough: LF ends the size line */
	case PH_CHUNK_EXT:
		if (ch != '\n')
			return ACT_NONE;
		if (st->line_len == 0)
			return set_lost(st); /* no digits */
		st->line_len = 0;
		st->phase = st->body_left ? PH_CHUNK_DATA : PH_TRAILER;
		return ACT_NONE;
	case PH_CHUNK_END:
		if (ch == '\n') {
			st->phase = PH_CHUNK_SZ;
			st->line_len = 0;
			st->body_left = 0;
		}
		return ACT_NONE;
	case PH_TRAILER:
		if (ch == '\n') {
			if (st->line_len == 0) {
				st->phase = PH_IDLE;
				return ACT_NONE;
			}
			st->line_len = 0;
		} else if (ch != '\r') {
			st->line_len++;
		}
		return ACT_NONE;
	}
	return ACT_NONE;
}

/* One byte of a started message (phase LINE0, HDRS or the chunk framing). A global
 * (non-static, noinline) function: the verifier checks it once, on its own, instead of at
 * every call site with every combination of caller state (which exceeds its budget). */
__attribute__((noinline)) int http_feed(struct http_state *st, __u32 ch)
{
	if (!st)
		return ACT_NONE;
	switch (st->phase) {
	case PH_LINE0:
		return byte_line0(st, ch);
	case PH_HDRS:
		return byte_hdrs(st, ch);
	case PH_CHUNK_SZ:
	case PH_CHUNK_EXT:
	case PH_CHUNK_END:
	case PH_TRAILER:
		return byte_chunk(st, ch);
	}
	return ACT_NONE;
}

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
		st->phase = PH_LINE0;
		v->act = ACT_MSG_START;
		v->act_pos = v->pos;
		return 1; /* the byte itself is consumed by PH_LINE0 on the next step */
	}
	__u32 was_line0 = st->phase == PH_LINE0;
	act = http_feed(st, ch);
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

/* --- trace context helpers -------------------------------------------------------------- */

static __always_inline void random_bytes(__u8 *out, int n)
{
#pragma unroll
	for (int i = 0; i < 16; i += 4) {
		if (i >= n)
			break;
		__u32 r = bpf_get_prandom_u32();
		__builtin_memcpy(out + i, &r, 4);
	}
}

static __always_inline int is_zero(const __u8 *p, int n)
{
	__u8 acc = 0;
#pragma unroll
	for (int i = 0; i < 16; i++)
		if (i < n)
			acc |= p[i];
	return acc == 0;
}

static __always_inline void new_span_id(__u8 *out)
{
	random_bytes(out, 8);
	if (is_zero(out, 8))
		out[7] = 1;
}

static __always_inline void new_trace_id(__u8 *out)
{
	random_bytes(out, 16);
	if (is_zero(out, 16))
		out[15] = 1;
}

/* Validate the captured traceparent strictly (same rules as obi/w3c.py) and, if valid,
 * put its trace-id, parent-id and flags into the state. Returns 1 if valid.
 * A global function: verified once on its own (the callers see only its result), and
 * branch-free over the digits (hex_lc), so its cost does not depend on where it is called
 * from. */
__attribute__((noinline)) int tp_parse(struct http_state *st)
{
	if (!st)
		return 0;
	const char *tp = st->tp;
	if (st->tp_count != 1 || st->tp_len < OBI_TP_LEN)
		return 0;
	if (tp[2] != '-' || tp[35] != '-' || tp[52] != '-')
		return 0;
	/* ok: AND of the table entries (HEX_DIGIT stays set only if every char is a digit) */
	__u8 vh = hex_lc[(__u8)tp[0]], vl = hex_lc[(__u8)tp[1]];
	__u8 ok = vh & vl;
	__u8 ver = (vh << 4) | (vl & 0xf);
	if (!(ok & HEX_DIGIT) || ver == 0xff)
		return 0;
	/* version 00 is exactly 55 chars; higher versions may continue after a '-' */
	if (ver == 0 ? st->tp_len != OBI_TP_LEN : (st->tp_len > OBI_TP_LEN && tp[55] != '-'))
		return 0;
	__u8 acc = 0; /* OR of the id bytes: all-zero ids are invalid */
#pragma unroll
	for (int i = 0; i < 16; i++) {
		__u8 h = hex_lc[(__u8)tp[3 + 2 * i]], l = hex_lc[(__u8)tp[4 + 2 * i]];
		ok &= h & l;
		st->trace_id[i] = (h << 4) | (l & 0xf);
		acc |= st->trace_id[i];
	}
	if (!acc)
		return 0;
	acc = 0;
#pragma unroll
	for (int i = 0; i < 8; i++) {
		__u8 h = hex_lc[(__u8)tp[36 + 2 * i]], l = hex_lc[(__u8)tp[37 + 2 * i]];
		ok &= h & l;
		st->parent_id[i] = (h << 4) | (l & 0xf);
		acc |= st->parent_id[i];
	}
	__u8 fh = hex_lc[(__u8)tp[53]], fl = hex_lc[(__u8)tp[54]];
	ok &= fh & fl;
	if (!(ok & HEX_DIGIT) || !acc)
		return 0;
	st->trace_flags = (fh << 4) | (fl & 0xf);
	return 1;
}

const volatile char hexdigits[16] = "0123456789abcdef";

/* "Traceparent: 00-<trace>-<span>-<flags>\r\n" (OBI_TP_HDR_LEN bytes) into out. */
static __always_inline void tp_format(char *out, const __u8 *trace_id, const __u8 *span_id, __u8 flags)
{
	__builtin_memcpy(out, "Traceparent: 00-", 16);
#pragma unroll
	for (int i = 0; i < 16; i++) {
		out[16 + 2 * i] = hexdigits[trace_id[i] >> 4];
		out[17 + 2 * i] = hexdigits[trace_id[i] & 0xf];
	}
	out[48] = '-';
#pragma unroll
	for (int i = 0; i < 8; i++) {
		out[49 + 2 * i] = hexdigits[span_id[i] >> 4];
		out[50 + 2 * i] = hexdigits[span_id[i] & 0xf];
	}
	out[65] = '-';
	out[66] = hexdigits[flags >> 4];
	out[67] = hexdigits[flags & 0xf];
	out[68] = '\r';
	out[69] = '\n';
}

#endif
