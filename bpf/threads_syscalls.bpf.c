// SPDX-License-Identifier: GPL-2.0
/* Per-thread linking (docs/architecture.md, decision 5) for kernels without sock:sock_recv_length
 * (5.17 - 6.2): the same link as threads.bpf.c, found from the syscall tracepoints
 * (CONFIG_FTRACE_SYSCALLS) of the calls that read sockets. The enter hook remembers which
 * fd the thread reads; the exit hook, if bytes were read, resolves the fd to its TCP socket
 * (obi_core.h, CO-RE) and links the thread. The loader attaches obi_sys_enter to every
 * SYSCALLS entry of obi/kernel/datapath.py and obi_sys_exit to the matching exits: one
 * program each, since all of them carry the fd as first argument and the byte count as
 * return value. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "obi_core.h"

char LICENSE[] SEC("license") = "GPL";

/* /sys/kernel/tracing/events/syscalls/sys_enter_<name>/format: every argument is 8 bytes
 * from offset 16; args[0] is the fd for read, readv, recvfrom and recvmsg. */
struct sys_enter_args {
	__u64 common;
	__s32 nr;
	__u32 _pad0;
	__u64 args[6];
};

/* .../sys_exit_<name>/format */
struct sys_exit_args {
	__u64 common;
	__s32 nr;
	__u32 _pad0;
	__s64 ret;
};

/* The fd a thread of a selected process is reading, between its syscall's enter and exit.
 * Key: pid_tgid. Value: fd. Written by obi_sys_enter, taken (deleted) by obi_sys_exit;
 * LRU bounds what threads killed inside a syscall leave. Private to this object. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u32);
} reading_fd SEC(".maps");

/* Hook: tracepoints syscalls:sys_enter_{read,readv,recvfrom,recvmsg}. Maps:
 * selected_tgids, reading_fd (write). Returns 0. */
SEC("tracepoint/syscalls/sys_enter_recvfrom")
int obi_sys_enter(struct sys_enter_args *a)
{
	if (!tgid_selected())
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	__u32 fd = (__u32)a->args[0];

	bpf_map_update_elem(&reading_fd, &id, &fd, BPF_ANY);
	return 0;
}

/* Hook: tracepoints syscalls:sys_exit_{read,readv,recvfrom,recvmsg}. Maps: reading_fd
 * (take), then those of thread_link_sock. Returns 0. */
SEC("tracepoint/syscalls/sys_exit_recvfrom")
int obi_sys_exit(struct sys_exit_args *a)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 *fdp = bpf_map_lookup_elem(&reading_fd, &id);

	if (!fdp)
		return 0;
	__u32 fd = *fdp;
	bpf_map_delete_elem(&reading_fd, &id);
	if (a->ret <= 0)
		return 0;
	struct sock *sk = sock_of_fd(fd);
	if (sk)
		thread_link_sock(sk);
	return 0;
}
