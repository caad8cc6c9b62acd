// SPDX-License-Identifier: GPL-2.0
/* Programs that exercise the libbpf binding in tests (tests/integration/test_libbpf.py):
 * map access, ring buffer delivery, BPF_PROG_TEST_RUN, globals set before load. Run only
 * with BPF_PROG_TEST_RUN or attached inside test namespaces; never part of the agent. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

/* Set from userspace before load (BpfObject.set_global). */
const volatile __u32 test_retval = TC_ACT_OK;
/* Counter in .bss: runs of obi_test_ringbuf. */
__u64 test_runs = 0;

/* Scratch hash for map round trips. Key: u32, value: u64. Written by userspace only. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u64);
} test_hash SEC(".maps");

/* Per-CPU counter. Key: u32 0, value: u64 packets seen by obi_test_ringbuf. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} test_percpu SEC(".maps");

/* Events to userspace: struct test_event per run of obi_test_ringbuf. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} test_events SEC(".maps");

struct test_event {
	__u32 len;     /* skb->len */
	__u32 marker;  /* 0x0b1e0b1e */
	__u8 head[16]; /* first 16 bytes of the packet */
};

/* Hook: tc. Context: __sk_buff. Maps: test_events (write), test_percpu (write).
 * Sends one test_event per packet; returns test_retval. */
SEC("tc")
int obi_test_ringbuf(struct __sk_buff *skb)
{
	struct test_event *ev;
	__u32 zero = 0;
	__u64 *cnt;

	cnt = bpf_map_lookup_elem(&test_percpu, &zero);
	if (cnt)
		__sync_fetch_and_add(cnt, 1);
	test_runs++;
	ev = bpf_ringbuf_reserve(&test_events, sizeof(*ev), 0);
	if (!ev)
		return TC_ACT_OK;
	ev->len = skb->len;
	ev->marker = 0x0b1e0b1e;
	if (bpf_skb_load_bytes(skb, 0, ev->head, sizeof(ev->head)) < 0)
		__builtin_memset(ev->head, 0, sizeof(ev->head));
	bpf_ringbuf_submit(ev, 0);
	return test_retval;
}

/* Hook: tc. Context: __sk_buff. Maps: none. Writes 0xff into byte 0 of the packet
 * (so test_run's data_out is checked) and returns TC_ACT_SHOT. */
SEC("tc")
int obi_test_mark(struct __sk_buff *skb)
{
	__u8 ff = 0xff;

	bpf_skb_store_bytes(skb, 0, &ff, 1, 0);
	return TC_ACT_SHOT;
}

/* Sockets for the sk_msg attach test. Key: u32, value: socket (cookie on lookup).
 * Written by userspace only (the test never puts sockets in it). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} test_sockhash SEC(".maps");

/* Hook: sk_msg on test_sockhash. Context: sk_msg_md. Maps: none. Returns SK_PASS. */
SEC("sk_msg")
int obi_test_sk_msg(struct sk_msg_md *msg)
{
	return SK_PASS;
}

/* Packets the cgroup_skb program saw (.bss, read by the test). */
__u64 test_cgroup_pkts = 0;

/* Hook: cgroup_skb/egress of a test cgroup. Context: __sk_buff. Maps: .bss
 * (test_cgroup_pkts). Returns 1 (allow). */
SEC("cgroup_skb/egress")
int obi_test_cgroup(struct __sk_buff *skb)
{
	__sync_fetch_and_add(&test_cgroup_pkts, 1);
	return 1;
}

/* Hook: tc, not loaded unless a test asks ("?" prefix). Reads packet data without a
 * bounds check, so the verifier rejects it: the test checks the log reaches BpfError. */
SEC("?tc")
int obi_test_bad(struct __sk_buff *skb)
{
	__u8 *data = (__u8 *)(long)skb->data;

	return data[20];
}
