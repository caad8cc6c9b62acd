/* SPDX-License-Identifier: GPL-2.0 */
/* HTTP/1.x stream parser shared by sk_msg (what a process writes) and tc ingress (what
 * arrives). It is a byte-level state machine whose state lives in a map value per
 * connection and direction, so messages may be cut anywhere (requests split over writes,
 * headers over segments) and bodies are skipped by arithmetic (Content-Length and chunked
 * framing), never scanned: a body can never be taken for a request start.
 *
 * Driving it over a message with bpf_loop is obi_parse.h's job; the trace context (W3C)
 * part is obi_w3c.h; "Verifier cost" below says what keeps all of it cheap to verify.
 * Nothing here reads outside the bytes of the current message.
 *
 * Verifier cost (docs/architecture.md, decision 9). Every program stays under a quarter of
 * the verifier's 1,000,000-instruction limit, on 5.17-6.7 (bpf_loop callbacks verified
 * once) as on 6.8+ (callbacks re-verified until their states converge), because:
 *  - the byte-level branching is in global (noinline) functions, http_feed and tp_parse:
 *    each is verified once, on its own, with its arguments unknown; a caller sees an
 *    unknown scalar back, so the callee's branches never multiply the caller's states;
 *  - digits are decoded through tables (hex_any, hex_lc): one load, no branch per digit;
 *  - the parse state lives in map values (the connection's http_state, the per-CPU
 *    scratch cursor), which the verifier does not track: a bpf_loop callback that advances
 *    it reaches the same abstract state on every pass and converges at once;
 *  - the callbacks are small: parse_step handles one byte, the program's round handles one
 *    window or one action.
 * tests/integration/test_verifier_budget.py measures it in every mode. */
#ifndef OBI_HTTP_H
#define OBI_HTTP_H

#include <linux/types.h>
#include "obi_abi.h"
#include "obi_tracestate.h"

#define WIN 1024       /* window size; a power of two (index masking) */
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
			* HTTP, never written into; requests are turns (see tpinjector.bpf.c) */
};

/* actions for the program */
enum { ACT_NONE = 0, ACT_MSG_START, ACT_LINE0_END, ACT_HDRS_END, ACT_LOST, ACT_TS_NEED };
/* ACT_TS_NEED: a server request has a tracestate header and the connection has no
 * ts_states entry yet: the program makes one and parses on (tctracer.bpf.c). */

/* http_state.bits */
#define HS_RESP (1u << 0)        /* this direction carries responses (else requests) */
#define HS_METHOD_DONE (1u << 1) /* saw the SP after the method */
#define HS_HAS_CL (1u << 2)
#define HS_CHUNKED (1u << 3)
#define HS_READY (1u << 4)    /* server request parsed: its ids may be linked to a thread */
#define HS_RESYNC (1u << 5)   /* tc: after a sequence gap, wait for a segment starting a message */
#define HS_INJECTED (1u << 6) /* sk_msg: header inserted for the current request */
#define HS_LINKED (1u << 7)   /* ids came from the thread's server request */
#define HS_TP_VALID (1u << 8)
#define HS_OPT_PENDING (1u << 9) /* egress TLS: the next data segment carries TCP option kind 25 */
#define HS_TCPOPT (1u << 10)     /* ingress TLS: the open request's ids came from kind 25 */
#define HS_NOBODY (1u << 11)     /* response to a HEAD request: no body, whatever the headers say */
#define HS_HAS_TE (1u << 12)     /* a Transfer-Encoding header was seen */

/* candidate header names (bit k of hmask) */
#define H_CL 1
#define H_TE 2
#define H_TP 4
#define H_TS 8
#define H_HOST 16
#define H_ALL (H_CL | H_TE | H_TP | H_TS | H_HOST)

/* Parse state of one direction of one connection. Internal (never read by userspace). */
struct http_state {
	__u64 body_left;  /* bytes left in the body / current chunk */
	__u64 cl;         /* Content-Length value being read */
	__u64 last8;      /* last 8 bytes of the start line (CR excluded): version check */
	__u64 start_ns;   /* time the current message started */
	__u64 server_tid; /* server connections: pid_tgid of the thread that read the current
			   * request (thread hook), the thread of the server span */
	__u64 head_ring;  /* requests of this connection whose response is still to come:
			   * bit (n & 63) of request n is set if it was HEAD (its response has
			   * no body). Kept in the ingress_conns entry (see head_push) */
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
	__u8 head_w;     /* head_ring: requests recorded */
	__u8 head_r;     /* head_ring: final responses seen */
	__u8 last_h;     /* H_* of the previous header line (an obs-fold continues it) */
	__u8 _pad2;
	__u16 tp_count;
	__u16 ts_count;
	__u16 tp_len;   /* significant length of the first traceparent value */
	__u16 line_cap; /* bytes kept in line[] */
	__u16 status;
	__u16 host_count;
	__u16 host_len; /* bytes of the first Host value (0 if longer than OBI_HOST_MAX) */
	__u16 _pad1;
	__u8 trace_id[16];
	__u8 span_id[8];
	__u8 parent_id[8];
	__u8 trace_flags;
	__u8 _pad0[7];
	char line[OBI_LINE_MAX];
	char tp[OBI_TP_MAX];
	char host[OBI_HOST_MAX];
};

/* The server request a thread is serving (map thread_ctx). */
/* bpf_loop context: only pointers, which stay the same for the whole program run. */
struct parse_ctx {
	struct http_state *st;
	struct scratch *sc;
	void *prog_ctx;      /* __sk_buff or sk_msg_md */
	struct ts_state *ts; /* where a server request's tracestate goes (obi_tracestate.h) */
};

struct thread_ctx {
	struct obi_tuple conn; /* the server connection it came on */
	__u8 trace_id[16];
	__u8 span_id[8]; /* the server span's id: parent of the thread's client spans */
	__u8 trace_flags;
	__u8 _pad0[7];
};

/* The header insertion pending for the request being written (sk_msg): decided at the end
 * of its headers (none if the application wrote its own traceparent), or at the end of the
 * message when the headers continue in a later write. */
struct ins {
	__u32 off;     /* message offset of the request line's LF (see tp_format) */
	__u32 ts_len;  /* bytes of ts to insert as a tracestate header (0: none) */
	__u32 written; /* bytes of the tracestate header written so far (insert_pending) */
	__u32 _pad0;
	char hdr[72];        /* OBI_TP_HDR_LEN bytes used (tp_format) */
	char ts[TS_OUT_MAX]; /* the tracestate passed on (the server request's, normalized) */
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
	__u32 pushed;  /* sk_msg: bytes inserted into this message so far */
	__u32 cur;     /* sk_msg: 1 while an insertion (ins) is pending */
	__u64 pid_tgid;
	struct obi_tuple t; /* the connection, seen from this host */
};

struct scratch {
	__u64 busy; /* > 1: another program on this CPU is using this slot (see scratch_get) */
	struct pcur pc;
	__u8 buf[2 * WIN];      /* WIN used; sized so that a 0x7ff-masked length is in bounds */
	struct http_state init; /* zeroed template for new map entries */
	struct ins ins;
	struct obi_event ev;        /* a request's event being built for open_spans */
	struct ts_state ts_standin; /* parse_ctx.ts while a connection has no ts_states entry */
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

/* Is the method token a registered HTTP method (IANA HTTP Method Registry, without PRI, the
 * HTTP/2 preface)? `m`: its last 8 characters packed big-endian (all of it when it has 8 or
 * fewer), `len`: its length. A text protocol whose first line happens to end in " HTTP/1.1"
 * ("USER bob HTTP/1.1" on an FTP control connection) is then not taken for HTTP. The same
 * list is fallback/http.py's HTTP_METHODS (a unit test compares them). */
static __always_inline int http_method(__u64 m, __u32 len)
{
	switch (len) {
	case 3:
		return m == 0x41434cULL /* ACL */ || m == 0x474554ULL /* GET */ ||
		       m == 0x505554ULL /* PUT */;
	case 4:
		return m == 0x42494e44ULL /* BIND */ || m == 0x434f5059ULL /* COPY */ ||
		       m == 0x48454144ULL /* HEAD */ || m == 0x4c494e4bULL /* LINK */ ||
		       m == 0x4c4f434bULL /* LOCK */ || m == 0x4d4f5645ULL /* MOVE */ ||
		       m == 0x504f5354ULL /* POST */;
	case 5:
		return m == 0x4c4142454cULL /* LABEL */ || m == 0x4d45524745ULL /* MERGE */ ||
		       m == 0x4d4b434f4cULL /* MKCOL */ || m == 0x5041544348ULL /* PATCH */ ||
		       m == 0x5155455259ULL /* QUERY */ || m == 0x5452414345ULL /* TRACE */;
	case 6:
		return m == 0x44454c455445ULL /* DELETE */ || m == 0x524542494e44ULL /* REBIND */ ||
		       m == 0x5245504f5254ULL /* REPORT */ || m == 0x534541524348ULL /* SEARCH */ ||
		       m == 0x554e42494e44ULL /* UNBIND */ || m == 0x554e4c494e4bULL /* UNLINK */ ||
		       m == 0x554e4c4f434bULL /* UNLOCK */ || m == 0x555044415445ULL /* UPDATE */;
	case 7:
		return m == 0x434845434b494eULL /* CHECKIN */ ||
		       m == 0x434f4e4e454354ULL /* CONNECT */ ||
		       m == 0x4f5054494f4e53ULL /* OPTIONS */;
	case 8:
		return m == 0x434845434b4f5554ULL /* CHECKOUT */ ||
		       m == 0x50524f5046494e44ULL /* PROPFIND */;
	case 9:
		return m == 0x524f505041544348ULL /* PROPPATCH */;
	case 10:
		return m == 0x4143544956495459ULL /* MKACTIVITY */ ||
		       m == 0x43414c454e444152ULL /* MKCALENDAR */ ||
		       m == 0x4445525041544348ULL /* ORDERPATCH */ ||
		       m == 0x434845434b4f5554ULL /* UNCHECKOUT */;
	case 11:
		return m == 0x4f524b5350414345ULL /* MKWORKSPACE */;
	case 13:
		return m == 0x4952454354524546ULL /* MKREDIRECTREF */;
	case 15:
		return m == 0x2d434f4e54524f4cULL /* VERSION-CONTROL */;
	case 16:
		return m == 0x2d434f4e54524f4cULL /* BASELINE-CONTROL */;
	case 17:
		return m == 0x4952454354524546ULL /* UPDATEREDIRECTREF */;
	}
	return 0;
}

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
	st->host_count = 0;
	st->host_len = 0;
	st->status = 0;
	st->last_h = 0;
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
static __always_inline void name_match(struct http_state *st, __u32 bit, const volatile char *name,
                                       __u32 nlen, __u32 idx, __u8 lc)
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
		if ((status >= 100 && status < 200) || status == 204 || status == 304 ||
		    (st->bits & HS_NOBODY)) {
			st->phase = PH_IDLE;
			return;
		}
	}
	if ((st->bits & (HS_HAS_TE | HS_CHUNKED)) == HS_HAS_TE) {
		st->phase = PH_LOST; /* a transfer coding we do not frame (RFC 9112 6.3) */
		return;
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
		if (st->line_cap < 12 || st->line[0] != 'H' || st->line[1] != 'T' ||
		    st->line[2] != 'T' || st->line[3] != 'P' || st->line[4] != '/' ||
		    st->line[5] != '1' || st->line[6] != '.' || st->line[8] != ' ')
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
	if (!(st->bits & (HS_RESP | HS_METHOD_DONE))) {
		/* last8 holds the method so far */
		if (ch == ' ') {
			if (!http_method(st->last8, st->line_len))
				return set_lost(st);
			st->bits |= HS_METHOD_DONE;
		} else if (!((ch >= 'A' && ch <= 'Z') || ch == '-') || st->line_len >= 17) {
			return set_lost(st);
		}
	}
	st->last8 = (st->last8 << 8) | ch;
	if (st->line_len < 0xffff)
		st->line_len++;
	return ACT_NONE;
}

/* Is this the request direction of a server connection, whose tracestate is collected
 * (obi_tracestate.h)? Client requests are only checked for a tracestate of their own. */
static __always_inline int ts_collects(const struct http_state *st)
{
	return st->role == OBI_ROLE_SERVER && !(st->bits & HS_RESP);
}

static __always_inline __u32 byte_hdrs(struct http_state *st, struct ts_state *ts, __u8 ch)
{
	if (ch == '\n') {
		if (st->line_len == 0) {
			headers_end(st);
			return ACT_HDRS_END;
		}
		if (st->hcur == H_CL && st->vlen == 0)
			return set_lost(st); /* Content-Length with no value */
		if (st->hcur == H_TP && st->tp_count == 1)
			st->tp_len = st->vend > 0xffff ? 0xffff : st->vend;
		if (st->hcur == H_TS && ts_collects(st))
			ts_header_end(ts);
		if (st->hcur == H_HOST && st->host_count == 1)
			st->host_len =
			    st->vend > OBI_HOST_MAX ? 0 : st->vend; /* cut would be wrong: drop */
		st->last_h = st->hcur;
		line_reset(st);
		return ACT_NONE;
	}
	if (ch == '\r')
		return ACT_NONE;
	if (st->line_len == 0 && (ch == ' ' || ch == '\t')) {
		/* obs-fold: this line continues the previous header's value. A framing header
		 * whose value we cannot read whole makes the stream unframeable: give it up. */
		if (st->last_h & (H_CL | H_TE))
			return set_lost(st);
		st->hmask = 0; /* not a header name: ignore the line */
	}
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
			if (st->hcur == H_TS) {
				st->ts_count++;
				if (ts_collects(st) && ts->standin == 1)
					return ACT_TS_NEED;
			}
			if (st->hcur == H_HOST)
				st->host_count++;
			if (st->hcur == H_CL) {
				st->bits |=
				    HS_HAS_CL; /* a repeated Content-Length restarts the value */
				st->cl = 0;
			}
			if (st->hcur == H_TE)
				st->bits |= HS_HAS_TE;
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
				/* digits after OWS inside the value ("1 2"), or too many */
				if (st->vend != v || st->cl > (1ULL << 50))
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
			if (ts_collects(st))
				ts_feed(ts, ch);
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
 * 1,000,000 instructions on some builds of 6.18). hex_any: both cases (chunk sizes); hex_lc,
 * lowercase only (W3C HEXDIGLC), is in obi_w3c.h. */
#define HEX_DIGIT 0x10
#define HEX_DIGITS_LC                                                                              \
	['0'] = 0x10, ['1'] = 0x11, ['2'] = 0x12, ['3'] = 0x13, ['4'] = 0x14, ['5'] = 0x15,        \
	['6'] = 0x16, ['7'] = 0x17, ['8'] = 0x18, ['9'] = 0x19, ['a'] = 0x1a, ['b'] = 0x1b,        \
	['c'] = 0x1c, ['d'] = 0x1d, ['e'] = 0x1e, ['f'] = 0x1f
const volatile __u8 hex_any[256] = {
    HEX_DIGITS_LC, ['A'] = 0x1a, ['B'] = 0x1b, ['C'] = 0x1c,
    ['D'] = 0x1d,  ['E'] = 0x1e, ['F'] = 0x1f,
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
__attribute__((noinline)) int http_feed(struct http_state *st, struct ts_state *ts, __u32 ch)
{
	if (!st || !ts)
		return ACT_NONE;
	switch (st->phase) {
	case PH_LINE0:
		return byte_line0(st, ch);
	case PH_HDRS:
		return byte_hdrs(st, ts, ch);
	case PH_CHUNK_SZ:
	case PH_CHUNK_EXT:
	case PH_CHUNK_END:
	case PH_TRAILER:
		return byte_chunk(st, ch);
	}
	return ACT_NONE;
}

/* --- HEAD requests: their responses have no body ----------------------------------------
 * The request direction records, per request, whether it was HEAD in head_ring of the
 * connection's ingress_conns entry (client connections: sk_msg, at the end of the request's
 * headers; server connections: tc ingress); the response direction takes the next bit at
 * each final status line (tc ingress / tc egress) and, for HEAD, frames no body. */

static __always_inline void head_push(struct http_state *conn, const struct http_state *req)
{
	__u64 bit = 1ULL << (conn->head_w & 63);

	if (req->line_cap >= 5 && req->line[0] == 'H' && req->line[1] == 'E' &&
	    req->line[2] == 'A' && req->line[3] == 'D' && req->line[4] == ' ')
		conn->head_ring |= bit;
	else
		conn->head_ring &= ~bit;
	conn->head_w++;
}

/* At a final response's status line: was its request HEAD? (0 when no request was
 * recorded, e.g. a connection joined mid-stream.) */
static __always_inline int head_pop(struct http_state *conn)
{
	if (conn->head_r == conn->head_w)
		return 0;
	int head = (conn->head_ring >> (conn->head_r & 63)) & 1;
	conn->head_r++;
	return head;
}

#endif
