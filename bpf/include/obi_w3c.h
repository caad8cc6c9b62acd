/* SPDX-License-Identifier: GPL-2.0 */
/* W3C Trace Context in the BPF programs, the counterpart of obi/w3c.py: validating an
 * incoming traceparent (tp_parse), formatting the one we insert (tp_format), and new
 * random ids (W3C Level 2: trace ids from bpf_get_prandom_u32, flag 0x02 set by callers). */
#ifndef OBI_W3C_H
#define OBI_W3C_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include "obi_abi.h"
#include "obi_http.h"

/* Lowercase hex digits (W3C HEXDIGLC): HEX_DIGIT | value, 0 for anything else (obi_http.h). */
const volatile __u8 hex_lc[256] = {HEX_DIGITS_LC};

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

/* a[0..n) == b[0..n), n <= 16 (ids), without a branch per byte. */
static __always_inline int bytes_eq(const __u8 *a, const __u8 *b, int n)
{
	__u8 acc = 0;
#pragma unroll
	for (int i = 0; i < 16; i++)
		if (i < n)
			acc |= a[i] ^ b[i];
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

/* The inserted header, OBI_TP_HDR_LEN bytes, written to go in front of the request line's
 * LF: "\nTraceparent: 00-<trace>-<span>-<flags>\r". With the LF that follows, the stream
 * reads "<request line>\r\nTraceparent: ...\r\n" (or, after a bare-LF request line,
 * "<request line>\nTraceparent: ...\r\n"): the same bytes as a header inserted after the
 * line, but the insertion point is inside the message even when the request line is all
 * the application wrote so far (bpf_msg_push_data at the very end of a message fails with
 * -EINVAL on kernels before late 2024). */
static __always_inline void tp_format(char *out, const __u8 *trace_id, const __u8 *span_id,
                                      __u8 flags)
{
	__builtin_memcpy(out, "\nTraceparent: 00-", 17);
#pragma unroll
	for (int i = 0; i < 16; i++) {
		out[17 + 2 * i] = hexdigits[trace_id[i] >> 4];
		out[18 + 2 * i] = hexdigits[trace_id[i] & 0xf];
	}
	out[49] = '-';
#pragma unroll
	for (int i = 0; i < 8; i++) {
		out[50 + 2 * i] = hexdigits[span_id[i] >> 4];
		out[51 + 2 * i] = hexdigits[span_id[i] & 0xf];
	}
	out[66] = '-';
	flags &= OBI_KNOWN_FLAGS; /* flags this version does not define are sent as zero */
	out[67] = hexdigits[flags >> 4];
	out[68] = hexdigits[flags & 0xf];
	out[69] = '\r';
}

#endif
