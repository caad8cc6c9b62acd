/* SPDX-License-Identifier: GPL-2.0 */
/* Small network helpers: tuples, address normalisation. */
#ifndef OBI_NET_H
#define OBI_NET_H

#include <linux/types.h>
#include <bpf/bpf_endian.h>
#include "obi_abi.h"

#define OBI_AF_INET 2
#define OBI_AF_INET6 10

/* An IPv6 tuple whose addresses are v4-mapped (::ffff:a.b.c.d) becomes an IPv4 tuple,
 * so a dual-stack socket and the IPv4 packets tc sees use the same key. */
static __always_inline void tuple_set_addrs6(struct obi_tuple *t, const __u32 *local,
                                             const __u32 *peer)
{
	if (local[0] == 0 && local[1] == 0 && local[2] == bpf_htonl(0xffff) && peer[0] == 0 &&
	    peer[1] == 0 && peer[2] == bpf_htonl(0xffff)) {
		t->family = OBI_AF_INET;
		__builtin_memcpy(t->local_addr, &local[3], 4);
		__builtin_memcpy(t->peer_addr, &peer[3], 4);
		return;
	}
	t->family = OBI_AF_INET6;
	__builtin_memcpy(t->local_addr, local, 16);
	__builtin_memcpy(t->peer_addr, peer, 16);
}

static __always_inline int tuple_eq(const struct obi_tuple *a, const struct obi_tuple *b)
{
	const __u16 *x = (const __u16 *)a, *y = (const __u16 *)b;
	__u16 diff = 0;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*a) / 2); i++)
		diff |= x[i] ^ y[i];
	return diff == 0;
}

/* Ports in the sock_ops / sk_msg context: remote_port is network order, stored either in
 * the low 16 bits or shifted up by 16 depending on the kernel; a port is never 0. */
static __always_inline __u16 ctx_remote_port(__u32 rp)
{
	return rp > 0xffff ? (__u16)bpf_ntohl(rp) : bpf_ntohs((__u16)rp);
}

#endif
