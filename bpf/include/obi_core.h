/* SPDX-License-Identifier: GPL-2.0 */
/* The few kernel structs the thread hooks read, declared by hand instead of a generated
 * vmlinux.h. preserve_access_index makes every field access a CO-RE relocation: libbpf
 * rewrites the offsets for the running kernel's BTF, so local layouts (and the _pad fields
 * that keep -Wpadded quiet) do not matter, only the field names and types.
 *
 * thread_link_sock(): the per-thread link of docs/architecture.md, decision 5, shared by every hook that
 * knows "this thread just read bytes from socket sk" (threads.bpf.c, threads_syscalls.bpf.c). */
#ifndef OBI_CORE_H
#define OBI_CORE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "obi_abi.h"
#include "obi_http.h"
#include "obi_maps.h"
#include "obi_net.h"

struct in6_addr___obi {
	union {
		__u32 u6_addr32[4];
	} in6_u;
} __attribute__((preserve_access_index));

struct sock_common {
	__u32 skc_daddr;
	__u32 skc_rcv_saddr;
	__u16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	__u16 _pad0;
	struct in6_addr___obi skc_v6_daddr;
	struct in6_addr___obi skc_v6_rcv_saddr;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	__u16 sk_protocol; /* a plain u16 since Linux 5.6 (a bitfield before) */
	__u16 _pad0[3];
} __attribute__((preserve_access_index));

struct socket {
	short type;
	__u16 _pad0[3];
	struct sock *sk;
} __attribute__((preserve_access_index));

struct inode {
	unsigned short i_mode;
} __attribute__((preserve_access_index));

struct file {
	struct inode *f_inode;
	void *private_data; /* struct socket * for socket files */
} __attribute__((preserve_access_index));

struct fdtable {
	unsigned int max_fds;
	__u32 _pad0;
	struct file **fd;
} __attribute__((preserve_access_index));

struct files_struct {
	struct fdtable *fdt;
} __attribute__((preserve_access_index));

struct task_struct {
	struct files_struct *files;
} __attribute__((preserve_access_index));

#define OBI_S_IFMT 0170000
#define OBI_S_IFSOCK 0140000
#define OBI_SOCK_STREAM 1
#define OBI_IPPROTO_TCP 6

/* The TCP socket behind file descriptor `fd` of the current task, or NULL (not open, not a
 * socket, not TCP). Walks current->files->fdt->fd[fd] with probe reads: no kallsyms, so a
 * socket file is recognised by its inode type (S_IFSOCK) rather than by its f_op. */
static __always_inline struct sock *sock_of_fd(__u32 fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds;
	struct file *f = 0;

	if (!fdt || fd >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	fds = BPF_CORE_READ(fdt, fd);
	if (!fds || bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]) || !f)
		return 0;
	if ((BPF_CORE_READ(f, f_inode, i_mode) & OBI_S_IFMT) != OBI_S_IFSOCK)
		return 0;
	struct socket *so = BPF_CORE_READ(f, private_data);
	if (!so || BPF_CORE_READ(so, type) != OBI_SOCK_STREAM)
		return 0;
	struct sock *sk = BPF_CORE_READ(so, sk);
	if (!sk || BPF_CORE_READ(sk, sk_protocol) != OBI_IPPROTO_TCP)
		return 0;
	return sk;
}

/* The current thread just read bytes from TCP socket `sk` (of a selected process): if that
 * is a server connection whose current request tc has parsed (READY), the thread is
 * serving that request, so thread_ctx remembers its server span for sk_msg (the parent of
 * the thread's outgoing requests). Maps: ingress_conns (read), thread_ctx (write),
 * counters. */
static __always_inline void thread_link_sock(struct sock *sk)
{
	struct obi_tuple t = {};
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);

	t.local_port = BPF_CORE_READ(sk, __sk_common.skc_num);
	t.peer_port = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (family == OBI_AF_INET) {
		__u32 l = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		__u32 r = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		t.family = OBI_AF_INET;
		__builtin_memcpy(t.local_addr, &l, 4);
		__builtin_memcpy(t.peer_addr, &r, 4);
	} else if (family == OBI_AF_INET6) {
		__u32 l[4], r[4];
		BPF_CORE_READ_INTO(&l, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr32);
		BPF_CORE_READ_INTO(&r, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr32);
		tuple_set_addrs6(&t, l, r);
	} else {
		return;
	}
	struct http_state *st = bpf_map_lookup_elem(&ingress_conns, &t);
	if (!st || st->role != OBI_ROLE_SERVER || !(st->bits & HS_READY))
		return;
	struct thread_ctx tc = {};
	tc.conn = t;
	__builtin_memcpy(tc.trace_id, st->trace_id, 16);
	__builtin_memcpy(tc.span_id, st->span_id, 8);
	tc.trace_flags = st->trace_flags;
	__u64 id = bpf_get_current_pid_tgid();
	st->server_tid = id; /* tc egress: the server span's thread, unlinked at the response */
	bpf_map_update_elem(&thread_ctx, &id, &tc, BPF_ANY);
	count(OBI_CNT_THREAD_LINKS);
}

#endif
