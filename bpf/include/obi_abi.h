/* SPDX-License-Identifier: GPL-2.0 */
/* The ONE header for everything that crosses between the BPF programs and userspace.
 * Mirrored by exactly one Python module, obi/kernel/abi.py; tests/unit/test_kernel_abi.py
 * checks the sizes and offsets below against the BTF of the built objects.
 * Rules: no packed structs, padding written out (the Makefile builds with -Wpadded
 * -Werror), fixed-width types only. */
#ifndef OBI_ABI_H
#define OBI_ABI_H

#include <linux/types.h>

/* Length of a version-00 traceparent value, and of the header line we insert:
 * "Traceparent: " (13) + 55 + "\r\n" (2). */
#define OBI_TP_LEN 55
#define OBI_TP_HDR_LEN 70
#define OBI_LINE_MAX 96        /* bytes of the request/status line kept in events */
#define OBI_TP_MAX 56          /* bytes of a traceparent value kept (55 + 1 to see what follows) */
#define OBI_TRACESTATE_MAX 512 /* tracestate passed on and reported (W3C: at least 512) */
#define OBI_HOST_MAX 128       /* bytes of a Host header value kept; longer ones are dropped */

/* TCP option carrying trace context (docs/architecture.md, decision 3). */
/* trace-flags defined so far: sampled (Level 1), random (Level 2); others are sent as 0 */
#define OBI_KNOWN_FLAGS 0x03

#define OBI_TCPOPT_KIND 25
#define OBI_TCPOPT_LEN_SAMPLED 26 /* kind, len, trace_id[16], span_id[8] */
#define OBI_TCPOPT_LEN_FLAGS 27   /* ... + flags[1] */

/* obi_cfg_flags (a `const volatile` global set before load):
 * HDR_INSERT: insert Traceparent into outgoing requests (headers propagation);
 * TCP: write / read TCP option kind 25;
 * HDR_READ: continue incoming traceparent headers (headers propagation, or
 * ebpf.track_request_headers alone, as in OBI). */
#define OBI_CFG_HDR_INSERT (1u << 0)
#define OBI_CFG_TCP (1u << 1)
#define OBI_CFG_HDR_READ (1u << 2)

/* Which end of a connection the instrumented process is. */
#define OBI_ROLE_CLIENT 1
#define OBI_ROLE_SERVER 2

/* A connection seen from the instrumented host: local = this host, peer = the other end.
 * IPv4 addresses sit in the first 4 bytes (network order), the rest is zero; v4-mapped
 * IPv6 addresses are stored as IPv4 so that TC (which sees IPv4) and sockets agree.
 * Ports in host order. Used as map key (ingress_conns) and in events. */
struct obi_tuple {
	__u8 local_addr[16];
	__u8 peer_addr[16];
	__u16 local_port;
	__u16 peer_port;
	__u16 family; /* AF_INET (2) or AF_INET6 (10) */
	__u16 _pad0;
};

/* Ring buffer events (map `events`). */
enum obi_event_kind {
	OBI_EV_SERVER_REQ = 1,  /* tc ingress: an incoming request's headers ended */
	OBI_EV_SERVER_RESP = 2, /* sk_msg: the server wrote a response status line */
	OBI_EV_CLIENT_REQ = 3,  /* sk_msg: the process sent a request's headers */
	OBI_EV_CLIENT_RESP = 4, /* tc ingress: a response status line arrived */
	OBI_EV_SERVER_SPAN = 5, /* sk_msg: a whole server span (request + response status) */
	OBI_EV_CLIENT_SPAN = 6, /* tc ingress: a whole client span (request + response status) */
};

/* obi_event.flags */
#define OBI_EVF_INJECTED (1u << 0)     /* we inserted a Traceparent header into this request */
#define OBI_EVF_TP_VALID (1u << 1)     /* the received traceparent was valid: parent_id from wire */
#define OBI_EVF_HDRS_PARTIAL (1u << 2) /* headers did not end within the scanned bytes */
#define OBI_EVF_THREAD_LINKED (1u << 3) /* parent is the server span the thread is serving */
#define OBI_EVF_TCPOPT (1u << 4)        /* context came from / went into TCP option kind 25 */
#define OBI_EVF_INJECT_FAILED (1u << 5) /* insertion was wanted but bpf_msg_push_data failed */
#define OBI_EVF_TLS (1u << 6)           /* a TLS turn: no method, path or status are known */

/* One event. The common case is one *_SPAN event per request: the request's event is
 * kept in map open_spans until its response's status line, then completed (status,
 * end_ns, pid_tgid of the responder for server spans) and sent. When a request comes while
 * the previous one of its connection is still unanswered (pipelining, or a response never
 * seen), that connection switches to pairs: *_REQ events (the held one first), then *_RESP
 * events that userspace pairs with the oldest open request of the tuple, until no request
 * is pending there. trace_id/span_id/parent_id: the ids of the span (server span: span_id
 * generated in BPF, parent from a valid incoming traceparent; client span: the ids written
 * into the inserted header). *_RESP events carry no ids. */
struct obi_event {
	__u32 kind;     /* enum obi_event_kind */
	__u32 flags;    /* OBI_EVF_* */
	__u64 ts_ns;    /* bpf_ktime_get_ns() (CLOCK_MONOTONIC): request start / response start */
	__u64 end_ns;   /* *_SPAN: response start (end of the span); else 0 */
	__u64 pid_tgid; /* sender (sk_msg) or the thread that read the request; 0 if unknown */
	struct obi_tuple tuple;
	__u8 trace_id[16];
	__u8 span_id[8];
	__u8 parent_id[8]; /* all zero: root span */
	__u8 trace_flags;
	__u8 tp_count;           /* traceparent headers seen in the request (saturating) */
	__u16 status;            /* HTTP status (*_RESP) */
	__u16 line_len;          /* bytes valid in line */
	__u16 tracestate_len;    /* bytes valid in tracestate */
	char line[OBI_LINE_MAX]; /* start of the request line / status line */
	char tp[OBI_TP_MAX]; /* first traceparent value as received (OWS trimmed at the start) */
	__u16 tp_len;        /* significant bytes of that value (trailing OWS trimmed) */
	__u16 host_len;      /* bytes valid in host (0: none, or longer than OBI_HOST_MAX) */
	__u32 _pad1;
	char tracestate[OBI_TRACESTATE_MAX]; /* server span: the incoming tracestate; client span:
					      * the one passed on (normalized, obi_tracestate.h) */
	char host[OBI_HOST_MAX]; /* first Host header value of the request (OWS trimmed) */
};

/* Per-CPU counters (map `counters`, index = enum value). */
enum obi_counter {
	OBI_CNT_EVENTS_LOST = 0,  /* ring buffer full */
	OBI_CNT_HEADERS_INSERTED, /* Traceparent headers written by sk_msg */
	OBI_CNT_INSERT_FAILED,    /* bpf_msg_push_data / pull failed: request left unchanged */
	OBI_CNT_CLIENT_REQS,      /* requests sent by selected processes */
	OBI_CNT_SERVER_REQS,      /* requests received on selected ports */
	OBI_CNT_APP_TRACEPARENT,  /* requests that already had traceparent: left unchanged */
	OBI_CNT_PARSE_LOST,       /* connections given up as not HTTP/1.x or out of sync */
	OBI_CNT_SEQ_GAPS,         /* tc saw a sequence gap (lost/out of order): resync */
	OBI_CNT_TCPOPT_WRITTEN,   /* kind-25 options written */
	OBI_CNT_TCPOPT_READ,      /* kind-25 options read */
	OBI_CNT_THREAD_LINKS,     /* recv by a thread linked it to a server request */
	OBI_CNT_SCRATCH_BUSY,   /* scratch slot in use on this CPU (nesting): message not parsed */
	OBI_CNT_UNSEEN_SENDS,   /* write_seq moved other than sk_msg saw (short send + resend) */
	OBI_CNT_SOCKS_RELEASED, /* client sockets sk_msg gave up on, taken out of sock_hash by tc */
	OBI_CNT_TRACESTATE_INSERTED, /* tracestate headers written (with a Traceparent) by sk_msg */
	OBI_CNT_TS_STATES_FULL, /* a request's tracestate not kept: ts_states full (none passed on) */
	OBI_CNT_MAX,
};

#endif
