/*
 * obi.fallback._nfq: the NFQUEUE reader of the userspace datapath, in C.
 *
 * Why C: a Python per-packet callback (netfilterqueue) makes every queued packet wait for
 * the whole Python handler before the kernel gets its verdict, and pays for the GIL and a
 * verdict syscall per packet. Most queued packets are never modified: the segments of
 * connections *served* by watched processes (requests in, responses out) are only read,
 * to make server spans. So the rules send those to a second queue, the "observe" queue,
 * and this module's reader thread accepts them at once (one batched verdict per receive
 * batch, no GIL involved) and hands copies to Python afterwards. Only the packets that may
 * have to change (client connections: header insertion, seq/ack translation, the mark on
 * the SYN) go through the "sync" queue and wait for Python's verdict.
 *
 * One netlink socket is bound to both queues, so packets reach Python in the order the
 * kernel queued them (a served request is always seen before the outgoing call it causes).
 *
 * Overload: copies of observed packets wait in a bounded backlog; when Python falls behind,
 * new copies are dropped and counted (the traffic is not held up; those spans are lost).
 * The observe queue is bound with NFQA_CFG_F_FAIL_OPEN: if even this thread falls behind,
 * the kernel accepts observed packets itself. The sync queue is not: its packets may need
 * sequence translation, and one let through untranslated would corrupt its stream; the
 * kernel drops those (TCP retransmits) when the queue is full, as before.
 *
 * Python API (see fallback/queue.py for the loop that uses it):
 *   r = Reader(sync_queue, observe_queue, maxlen, backlog, backlog_bytes, syn_queue=-1)   binds the
 *       queues, starts the thread; backlog/backlog_bytes bound the copies of observed packets
 *       waiting for Python; syn_queue: a second queue whose packets (the SYNs of selected
 *       processes) also wait for Python's verdict, bound fail-open
 *   Packet ids are tickets: the kernel's id, bit 32 set for a packet of the SYN queue.
 *   r.fetch(timeout_s, max_items, shed_after_s) -> [(data, outgoing, ts_ns, packet_id or None, lost), ...]
 *       (GIL released while waiting); lost: observed packets Python will never see, lost just
 *       before this one; copies older than shed_after_s ahead of a sync packet are dropped
 *       (observe_shed) so that it does not wait for them
 *   r.verdict(packet_id, payload or None, mark)   NF_ACCEPT for a sync packet (new bytes/mark optional;
 *       ValueError for a payload above 65,531 bytes, what one netlink attribute holds)
 *   r.drop(packet_id)   NF_DROP for a sync packet (its changed bytes could not be sent)
 *   r.take_lost() -> observed packets lost after the last packet fetch() returned (when idle)
 *   r.stats() -> dict;  r.close()   (unfetched sync packets are accepted unchanged)
 * close() may run while other threads are in fetch()/verdict(): it waits for them to leave
 * (they raise ValueError from then on), so nothing is freed or closed under them.
 *
 * Only messages from the kernel (nl_pid 0) are read; others are counted (`foreign`). A packet
 * longer than the copy range (65,531 bytes, NFQA_CAP_LEN) arrives cut: an observed one is
 * counted lost (`truncated`), a sync one accepted unchanged.
 */
#define _GNU_SOURCE /* pthread_setname_np */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <linux/netlink.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 32                          /* netlink messages per recvmmsg() */
#define MSG_ROOM (65536 + 4096)           /* a whole 64 KiB packet (copy range 0xffff) plus attributes */
#define RCVBUF_BYTES (8 << 20)            /* so a burst does not overflow the socket */
#define COPY_RANGE 0xffff                 /* the kernel caps it at MAX_PAYLOAD: longer packets come cut */
#define MAX_PAYLOAD (0xffff - NLA_HDRLEN) /* the most one attribute carries (nla_len is 16 bits) */
#define MAX_TIMEOUT_S 86400.0             /* fetch() waits at most this long per call */

typedef struct pkt {
    struct pkt *next;
    uint32_t id;
    uint8_t outgoing;
    uint8_t sync;   /* waits for Python's verdict */
    uint16_t queue; /* the queue it came from (its verdict goes there) */
    int64_t ts_ns;  /* CLOCK_REALTIME when read from the socket */
    uint32_t len;
    uint32_t lost; /* observed packets not handed on since the previous one */
    unsigned char data[];
} pkt_t;

typedef struct {
    PyObject_HEAD
    int fd;
    int wake_fd; /* eventfd: tells the reader thread to stop */
    uint16_t sync_queue, observe_queue;
    int syn_queue; /* a second sync queue, bound fail-open (SYNs), or -1 */
    pthread_t thread;
    int thread_started;
    int closed;         /* close() ran (GIL held when read or written) */
    int stop;           /* tells the reader thread to end (atomic) */
    pthread_mutex_t mu; /* guards the list, the counters below, closing and active */
    pthread_cond_t cv;  /* signalled when packets are appended or the thread ends */
    pkt_t *head, *tail;
    uint64_t observe_waiting;        /* copies of observed packets in the list */
    uint64_t observe_bytes;          /* and their size */
    uint32_t lost_pending;           /* observed packets lost since the last one appended */
    uint64_t sync_waiting;           /* sync packets in the list */
    uint64_t backlog, backlog_bytes; /* limits of the two */
    int thread_done;
    int closing; /* close() started: fetch() and verdict() refuse */
    int active;  /* fetch()/verdict() calls using the list or the socket */
    /* counters (under mu) */
    uint64_t received, observed, observe_dropped, observe_shed, acks_skipped, sync, recv_errors, overruns,
        truncated, unparsed, foreign;
    uint64_t verdicts, drops, send_errors; /* atomic: counted by whichever thread sent */
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_nl from[BATCH]; /* sender of each message: only the kernel (nl_pid 0) is heard */
    unsigned char *rbuf;
} Reader;

/* --- netlink plumbing ------------------------------------------------------------------ */

static struct sockaddr_nl kernel_addr = {.nl_family = AF_NETLINK};

static size_t put_attr(unsigned char *buf, size_t off, uint16_t type, const void *data, size_t len)
{
    struct nlattr *a = (struct nlattr *)(buf + off);
    a->nla_type = type;
    a->nla_len = (uint16_t)(NLA_HDRLEN + len);
    if (len)
        memcpy(buf + off + NLA_HDRLEN, data, len);
    size_t end = off + NLA_ALIGN(NLA_HDRLEN + len);
    memset(buf + off + NLA_HDRLEN + len, 0, end - off - NLA_HDRLEN - len);
    return end;
}

/* Start a queue-subsystem message in buf; returns the offset where attributes go. */
static size_t put_header(unsigned char *buf, uint8_t msg, uint16_t flags, uint16_t queue, uint32_t seq)
{
    struct nlmsghdr *nlh = (struct nlmsghdr *)buf;
    nlh->nlmsg_type = (NFNL_SUBSYS_QUEUE << 8) | msg;
    nlh->nlmsg_flags = NLM_F_REQUEST | flags;
    nlh->nlmsg_seq = seq;
    nlh->nlmsg_pid = 0;
    struct nfgenmsg *g = (struct nfgenmsg *)(buf + NLMSG_HDRLEN);
    g->nfgen_family = AF_UNSPEC;
    g->version = NFNETLINK_V0;
    g->res_id = htons(queue);
    return NLMSG_HDRLEN + NLMSG_ALIGN(sizeof(struct nfgenmsg));
}

static void finish(unsigned char *buf, size_t len) { ((struct nlmsghdr *)buf)->nlmsg_len = (uint32_t)len; }

static int send_all(int fd, const void *buf, size_t len)
{
    for (;;) {
        ssize_t n = sendto(fd, buf, len, 0, (struct sockaddr *)&kernel_addr, sizeof kernel_addr);
        if (n >= 0)
            return 0;
        if (errno != EINTR)
            return -errno;
    }
}

/* The parts of a queued-packet message this module uses. */
struct packet_msg {
    uint16_t queue;
    const struct nfqnl_msg_packet_hdr *hdr; /* NULL if the message had none */
    unsigned char *payload;
    uint32_t len;
    uint32_t cap_len; /* the packet's real length when the copy was cut (NFQA_CAP_LEN), else 0 */
};

static void read_packet_msg(struct nlmsghdr *h, struct packet_msg *m)
{
    struct nfgenmsg *g = NLMSG_DATA(h);
    m->queue = ntohs(g->res_id);
    m->hdr = NULL;
    m->payload = NULL;
    m->len = 0;
    m->cap_len = 0;
    struct nlattr *a = (struct nlattr *)((char *)g + NLMSG_ALIGN(sizeof *g));
    int left = (int)h->nlmsg_len - (int)((char *)a - (char *)h);
    for (; left >= NLA_HDRLEN && a->nla_len >= NLA_HDRLEN && a->nla_len <= left;
         left -= NLA_ALIGN(a->nla_len), a = (struct nlattr *)((char *)a + NLA_ALIGN(a->nla_len))) {
        int type = a->nla_type & NLA_TYPE_MASK;
        if (type == NFQA_PACKET_HDR && a->nla_len >= NLA_HDRLEN + sizeof *m->hdr)
            m->hdr = (void *)((char *)a + NLA_HDRLEN);
        else if (type == NFQA_PAYLOAD) {
            m->payload = (unsigned char *)a + NLA_HDRLEN;
            m->len = a->nla_len - NLA_HDRLEN;
        } else if (type == NFQA_CAP_LEN && a->nla_len >= NLA_HDRLEN + sizeof(uint32_t)) {
            uint32_t cap;
            memcpy(&cap, (char *)a + NLA_HDRLEN, sizeof cap);
            m->cap_len = ntohl(cap);
        }
    }
}

/* A verdict (NF_ACCEPT, NF_DROP) for one packet (NFQNL_MSG_VERDICT) or for every packet of
 * the queue up to this id (NFQNL_MSG_VERDICT_BATCH), id_be as the kernel sent it; with a new
 * mark and/or new packet bytes when given (mark 0 / payload NULL: unchanged). 0 or -errno. */
static int send_verdict_msg(int fd, uint8_t msg, uint16_t queue, uint32_t id_be, uint32_t verdict,
                            uint32_t mark, const void *payload, size_t len)
{
    unsigned char small[128];
    if (payload && len > MAX_PAYLOAD)
        return -EMSGSIZE; /* nla_len would wrap: the kernel would refuse the verdict */
    unsigned char *buf = payload ? malloc(sizeof small + NLA_ALIGN(len)) : small;
    if (!buf)
        return -ENOMEM;
    size_t off = put_header(buf, msg, 0, queue, 0);
    struct nfqnl_msg_verdict_hdr vh = {htonl(verdict), id_be};
    off = put_attr(buf, off, NFQA_VERDICT_HDR, &vh, sizeof vh);
    if (mark) {
        uint32_t m = htonl(mark);
        off = put_attr(buf, off, NFQA_MARK, &m, sizeof m);
    }
    if (payload)
        off = put_attr(buf, off, NFQA_PAYLOAD, payload, len);
    finish(buf, off);
    int err = send_all(fd, buf, off);
    if (buf != small)
        free(buf);
    return err;
}

static int send_accept(int fd, uint8_t msg, uint16_t queue, uint32_t id_be)
{
    return send_verdict_msg(fd, msg, queue, id_be, NF_ACCEPT, 0, NULL, 0);
}

/* Send a request built with NLM_F_ACK and wait for the kernel's answer: 0 or -errno. */
static int request(int fd, unsigned char *msg, size_t len, uint32_t seq)
{
    int err = send_all(fd, msg, len);
    if (err)
        return err;
    unsigned char *rb = malloc(MSG_ROOM);
    if (!rb)
        return -ENOMEM;
    err = -ETIMEDOUT;
    for (int tries = 0; tries < 10000 && err == -ETIMEDOUT; tries++) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 2000) <= 0)
            break;
        struct sockaddr_nl from = {0};
        socklen_t fromlen = sizeof from;
        int n = (int)recvfrom(fd, rb, MSG_ROOM, 0, (struct sockaddr *)&from, &fromlen);
        if (n < 0) {
            if (errno == EINTR || errno == ENOBUFS)
                continue;
            err = -errno;
            break;
        }
        if (fromlen < sizeof from || from.nl_pid != 0)
            continue; /* not from the kernel */
        for (struct nlmsghdr *h = (struct nlmsghdr *)rb; NLMSG_OK(h, n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_type == NLMSG_ERROR && h->nlmsg_seq == seq) {
                err = ((struct nlmsgerr *)NLMSG_DATA(h))->error;
                break;
            }
            if (h->nlmsg_type == ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET)) {
                /* A packet queued while we were configuring (a rule of ours already in place). */
                struct packet_msg m;
                read_packet_msg(h, &m);
                if (m.hdr)
                    send_accept(fd, NFQNL_MSG_VERDICT, m.queue, m.hdr->packet_id);
            }
        }
    }
    free(rb);
    return err;
}

static int config(int fd, uint16_t queue, uint16_t type, const void *data, size_t len, uint32_t seq)
{
    unsigned char buf[128];
    size_t off = put_header(buf, NFQNL_MSG_CONFIG, NLM_F_ACK, queue, seq);
    off = put_attr(buf, off, type, data, len);
    finish(buf, off);
    return request(fd, buf, off, seq);
}

static int bind_queue(int fd, uint16_t queue, uint32_t maxlen, uint32_t flags, uint32_t *seq)
{
    struct nfqnl_msg_config_cmd cmd = {.command = NFQNL_CFG_CMD_BIND, .pf = htons(AF_UNSPEC)};
    int err = config(fd, queue, NFQA_CFG_CMD, &cmd, sizeof cmd, ++*seq);
    if (err)
        return err;
    struct nfqnl_msg_config_params params = {.copy_range = htonl(COPY_RANGE), .copy_mode = NFQNL_COPY_PACKET};
    if ((err = config(fd, queue, NFQA_CFG_PARAMS, &params, sizeof params, ++*seq)))
        return err;
    uint32_t ml = htonl(maxlen);
    if ((err = config(fd, queue, NFQA_CFG_QUEUE_MAXLEN, &ml, sizeof ml, ++*seq)))
        return err;
    if (!flags)
        return 0;
    /* NFQA_CFG_FLAGS is only taken together with NFQA_CFG_MASK, in the same message. */
    unsigned char buf[128];
    size_t off = put_header(buf, NFQNL_MSG_CONFIG, NLM_F_ACK, queue, ++*seq);
    uint32_t f = htonl(flags);
    off = put_attr(buf, off, NFQA_CFG_MASK, &f, sizeof f);
    off = put_attr(buf, off, NFQA_CFG_FLAGS, &f, sizeof f);
    finish(buf, off);
    return request(fd, buf, off, *seq);
}

/* --- the reader thread ------------------------------------------------------------------ */

/* An observed segment Python has no use for: TCP with no payload and no SYN/FIN/RST (a bare
 * ACK). Server connections are parsed from their data and their SYN/FIN/RST only. Anything
 * this does not understand (IPv6 extension headers, fragments) is handed on. */
static int bare_ack(const unsigned char *p, uint32_t len)
{
    uint32_t ip_len, total;
    if (len >= 20 && p[0] >> 4 == 4) {
        ip_len = (p[0] & 15) * 4u;
        total = (uint32_t)p[2] << 8 | p[3];
        if (p[9] != 6 || ip_len < 20 || (((p[6] & 0x3f) << 8) | p[7]) != 0) /* not TCP, or a fragment */
            return 0;
    } else if (len >= 40 && p[0] >> 4 == 6) {
        ip_len = 40;
        total = 40 + ((uint32_t)p[4] << 8 | p[5]);
        if (p[6] != 6)
            return 0;
    } else {
        return 0;
    }
    if (total > len || ip_len + 20 > total)
        return 0;
    const unsigned char *tcp = p + ip_len;
    uint32_t tcp_len = (tcp[12] >> 4) * 4u;
    uint8_t flags = tcp[13];
    return tcp_len >= 20 && ip_len + tcp_len == total && !(flags & 0x07); /* FIN 1, SYN 2, RST 4 */
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void send_verdict(Reader *r, uint8_t msg, uint16_t queue, uint32_t id_be)
{
    if (send_accept(r->fd, msg, queue, id_be))
        __atomic_fetch_add(&r->send_errors, 1, __ATOMIC_RELAXED);
}

/* One packet message: returns a list node (NULL for a packet only accepted). *observe_id is
 * set to the id of an observed packet, which the caller accepts in one batch verdict. */
static pkt_t *take_packet(Reader *r, struct nlmsghdr *h, int truncated, uint32_t *observe_id,
                          int *seen_observe)
{
    struct packet_msg m;
    read_packet_msg(h, &m);
    const struct nfqnl_msg_packet_hdr *ph = m.hdr;
    uint16_t queue = m.queue;
    unsigned char *payload = m.payload;
    uint32_t plen = m.len;
    if (!ph) {
        r->unparsed++;
        return NULL;
    }
    int observe = queue == r->observe_queue;
    if (observe) {
        *observe_id = ph->packet_id;
        *seen_observe = 1;
    }
    if (m.cap_len > plen)
        truncated = 1; /* longer than the copy range: cut, its framing lost */
    if (truncated || !payload) {
        /* Cannot hand it on whole: accept it as it is (fail open). */
        r->truncated++;
        r->lost_pending += observe;
        if (!observe)
            send_verdict(r, NFQNL_MSG_VERDICT, queue, ph->packet_id);
        return NULL;
    }
    if (observe && bare_ack(payload, plen)) {
        r->acks_skipped++;
        return NULL;
    }
    if (observe && (r->observe_waiting >= r->backlog || r->observe_bytes + plen > r->backlog_bytes)) {
        r->observe_dropped++;
        r->lost_pending++;
        return NULL;
    }
    pkt_t *p = malloc(sizeof *p + plen);
    if (!p) {
        r->overruns++;
        r->lost_pending += observe;
        if (!observe)
            send_verdict(r, NFQNL_MSG_VERDICT, queue, ph->packet_id);
        return NULL;
    }
    p->next = NULL;
    p->id = ntohl(ph->packet_id);
    p->outgoing = ph->hook == NF_INET_LOCAL_OUT;
    p->sync = !observe;
    p->queue = queue;
    p->ts_ns = now_ns();
    p->len = plen;
    p->lost = r->lost_pending;
    r->lost_pending = 0;
    memcpy(p->data, payload, plen);
    if (observe) {
        r->observed++;
        r->observe_waiting++;
        r->observe_bytes += plen;
    } else {
        r->sync++;
        r->sync_waiting++;
    }
    return p;
}

static void *reader_main(void *arg)
{
    Reader *r = arg;
    pthread_setname_np(pthread_self(), "obi-nfq-reader"); /* shows in top -H, /proc/<pid>/task */
    for (int i = 0; i < BATCH; i++) {
        r->iov[i].iov_base = r->rbuf + (size_t)i * MSG_ROOM;
        r->iov[i].iov_len = MSG_ROOM;
        memset(&r->msgs[i].msg_hdr, 0, sizeof r->msgs[i].msg_hdr);
        r->msgs[i].msg_hdr.msg_iov = &r->iov[i];
        r->msgs[i].msg_hdr.msg_iovlen = 1;
    }
    while (!__atomic_load_n(&r->stop, __ATOMIC_ACQUIRE)) {
        for (int i = 0; i < BATCH; i++) {
            r->msgs[i].msg_hdr.msg_name = &r->from[i];
            r->msgs[i].msg_hdr.msg_namelen = sizeof r->from[i];
        }
        struct pollfd p[2] = {{.fd = r->fd, .events = POLLIN}, {.fd = r->wake_fd, .events = POLLIN}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (__atomic_load_n(&r->stop, __ATOMIC_ACQUIRE) || p[1].revents)
            break;
        int n = recvmmsg(r->fd, r->msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n < 0) {
            pthread_mutex_lock(&r->mu);
            if (errno == ENOBUFS) {
                /* The socket overflowed: the kernel dropped (sync) or accepted (observe)
                 * packets we never saw; Python must not trust stream continuity. */
                r->overruns++;
                r->lost_pending++;
            } else if (errno != EAGAIN && errno != EINTR)
                r->recv_errors++;
            pthread_mutex_unlock(&r->mu);
            continue;
        }
        pkt_t *first = NULL, *last = NULL;
        uint32_t observe_id = 0;
        int seen_observe = 0;
        pthread_mutex_lock(&r->mu);
        for (int i = 0; i < n; i++) {
            int len = (int)r->msgs[i].msg_len;
            int truncated = (r->msgs[i].msg_hdr.msg_flags & MSG_TRUNC) != 0;
            if (r->msgs[i].msg_hdr.msg_namelen < sizeof r->from[i] || r->from[i].nl_pid != 0) {
                r->foreign++; /* another process wrote to our socket: not a queued packet */
                continue;
            }
            for (struct nlmsghdr *h = r->iov[i].iov_base; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
                if (h->nlmsg_type >> 8 != NFNL_SUBSYS_QUEUE || (h->nlmsg_type & 0xff) != NFQNL_MSG_PACKET) {
                    if (h->nlmsg_type == NLMSG_ERROR && ((struct nlmsgerr *)NLMSG_DATA(h))->error)
                        __atomic_fetch_add(&r->send_errors, 1, __ATOMIC_RELAXED); /* a refused verdict */
                    continue;
                }
                r->received++;
                pkt_t *pk = take_packet(r, h, truncated, &observe_id, &seen_observe);
                if (pk) {
                    if (last)
                        last->next = pk;
                    else
                        first = pk;
                    last = pk;
                }
            }
        }
        if (first) {
            if (r->tail)
                r->tail->next = first;
            else
                r->head = first;
            r->tail = last;
            pthread_cond_broadcast(&r->cv);
        }
        pthread_mutex_unlock(&r->mu);
        /* Observed packets are only read: accept all of them up to the last id at once. */
        if (seen_observe)
            send_verdict(r, NFQNL_MSG_VERDICT_BATCH, r->observe_queue, observe_id);
    }
    pthread_mutex_lock(&r->mu);
    r->thread_done = 1;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

/* --- Python type ------------------------------------------------------------------------ */

/* Called by close() with mu held, once no fetch() or verdict() is running. */
static void release_all(Reader *r)
{
    /* Unfetched sync packets get NF_ACCEPT unchanged: their rules are gone by now. */
    pkt_t *p = r->head;
    r->head = r->tail = NULL;
    r->observe_waiting = r->observe_bytes = r->sync_waiting = 0;
    while (p) {
        pkt_t *next = p->next;
        if (p->sync && r->fd >= 0)
            send_verdict(r, NFQNL_MSG_VERDICT, p->queue, htonl(p->id));
        free(p);
        p = next;
    }
}

/* Stop the thread, wait for fetch()/verdict() calls of other threads to leave (they
 * refuse from now on: `closing`), accept what is left, close the socket. Never frees or
 * closes what another call is using. Called with the GIL held. */
static void reader_close(Reader *r)
{
    if (r->closed)
        return;
    r->closed = 1;
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&r->mu);
    r->closing = 1;
    pthread_cond_broadcast(&r->cv); /* wakes a fetch() waiting for packets */
    pthread_mutex_unlock(&r->mu);
    if (r->thread_started) {
        __atomic_store_n(&r->stop, 1, __ATOMIC_RELEASE);
        uint64_t one = 1;
        if (write(r->wake_fd, &one, sizeof one) < 0) { /* the flag alone ends it at the next packet */
        }
        pthread_join(r->thread, NULL);
        r->thread_started = 0;
    }
    pthread_mutex_lock(&r->mu);
    while (r->active)
        pthread_cond_wait(&r->cv, &r->mu);
    release_all(r);
    if (r->fd >= 0) {
        close(r->fd); /* unbinds both queues; the kernel flushes what is still queued */
        r->fd = -1;
    }
    pthread_mutex_unlock(&r->mu);
    Py_END_ALLOW_THREADS if (r->wake_fd >= 0)
    {
        close(r->wake_fd);
        r->wake_fd = -1;
    }
    free(r->rbuf);
    r->rbuf = NULL;
}

static void Reader_dealloc(Reader *r)
{
    reader_close(r);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *Reader_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *names[] = {"sync_queue",    "observe_queue", "maxlen", "backlog",
                            "backlog_bytes", "syn_queue",     NULL};
    int sq, oq, synq = -1;
    unsigned int maxlen = 4096;
    unsigned long long backlog = 65536, backlog_bytes = 64ULL << 20;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ii|IKKi", names, &sq, &oq, &maxlen, &backlog, &backlog_bytes,
                                     &synq))
        return NULL;
    if (sq < 0 || sq > 65535 || oq < 0 || oq > 65535 || sq == oq || synq < -1 || synq > 65535 || synq == sq ||
        synq == oq) {
        PyErr_SetString(PyExc_ValueError,
                        "queue numbers must be different values in 0..65535 (syn_queue: -1 for none)");
        return NULL;
    }
    Reader *r = (Reader *)type->tp_alloc(type, 0);
    if (!r)
        return NULL;
    r->fd = r->wake_fd = -1;
    r->sync_queue = (uint16_t)sq;
    r->observe_queue = (uint16_t)oq;
    r->syn_queue = synq;
    r->backlog = backlog;
    r->backlog_bytes = backlog_bytes;
    pthread_mutex_init(&r->mu, NULL);
    pthread_condattr_t ca; /* fetch() timeouts on the monotonic clock: wall-clock steps do not stretch them */
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&r->cv, &ca);
    pthread_condattr_destroy(&ca);
    r->rbuf = malloc((size_t)BATCH * MSG_ROOM);
    r->fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_NETFILTER);
    r->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (!r->rbuf || r->fd < 0 || r->wake_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(r);
        return NULL;
    }
    struct sockaddr_nl local = {.nl_family = AF_NETLINK};
    int size = RCVBUF_BYTES;
    if (setsockopt(r->fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
        setsockopt(r->fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    int err = 0;
    uint32_t seq = (uint32_t)time(NULL);
    const char *what = "bind the netlink socket";
    if (bind(r->fd, (struct sockaddr *)&local, sizeof local) < 0)
        err = -errno;
    if (!err) {
        what = "bind the sync queue";
        err = bind_queue(r->fd, r->sync_queue, maxlen, 0, &seq);
    }
    if (!err) {
        what = "bind the observe queue";
        err = bind_queue(r->fd, r->observe_queue, maxlen, NFQA_CFG_F_FAIL_OPEN, &seq);
    }
    if (!err && synq >= 0) {
        what = "bind the SYN queue";
        /* Fail-open: when Python is behind and the queue is full, a SYN passes unmarked (its
         * connection is not traced) instead of being dropped. */
        err = bind_queue(r->fd, (uint16_t)synq, maxlen, NFQA_CFG_F_FAIL_OPEN, &seq);
    }
    if (err) {
        PyErr_Format(PyExc_OSError, "NFQUEUE: cannot %s (queues %d/%d): %s%s", what, sq, oq, strerror(-err),
                     err == -EBUSY ? " (another process reads this queue)" : "");
        Py_DECREF(r);
        return NULL;
    }
    if ((err = pthread_create(&r->thread, NULL, reader_main, r))) {
        PyErr_Format(PyExc_OSError, "NFQUEUE: cannot start the reader thread: %s", strerror(err));
        Py_DECREF(r);
        return NULL;
    }
    r->thread_started = 1;
    return (PyObject *)r;
}

/* A sync packet waits behind the copies queued before it. When the oldest of those is older
 * than shed_ns, drop the copies ahead of the last sync packet waiting (their count travels
 * on as `lost`), so a client connection is not held up by the backlog of served ones.
 * Called with mu held. */
static void shed_ahead_of_sync(Reader *r, int64_t shed_ns)
{
    if (!r->sync_waiting || !r->head || r->head->sync || now_ns() - r->head->ts_ns <= shed_ns)
        return;
    pkt_t *last_sync = NULL;
    for (pkt_t *p = r->head; p; p = p->next)
        if (p->sync)
            last_sync = p;
    if (!last_sync)
        return; /* sync_waiting counted one the list no longer has */
    uint32_t carried = 0;
    pkt_t **link = &r->head;
    while (*link != last_sync) {
        pkt_t *p = *link;
        if (p->sync) {
            p->lost += carried;
            carried = 0;
            link = &p->next;
            continue;
        }
        *link = p->next;
        carried += p->lost + 1;
        r->observe_waiting--;
        r->observe_bytes -= p->len;
        r->observe_shed++;
        free(p);
    }
    last_sync->lost += carried; /* the tail is last_sync or after it: unchanged */
}

/* The packet id Python sees: the kernel's id, plus bit 32 for the SYN queue (verdict() and
 * drop() send to the queue the packet came from). */
static unsigned long long ticket(Reader *r, const pkt_t *p)
{
    return p->id | ((unsigned long long)(r->syn_queue >= 0 && p->queue == r->syn_queue) << 32);
}

/* The queue of a ticket, or -1 if it names none of ours. */
static int ticket_queue(Reader *r, unsigned long long t)
{
    if (t >> 33)
        return -1;
    if (t >> 32)
        return r->syn_queue;
    return r->sync_queue;
}

/* fetch()/verdict() enter (GIL released) before using the list or the socket, and leave
 * when done: close() waits for them. 0, or -1 when the reader is closing. */
static int enter(Reader *r)
{
    pthread_mutex_lock(&r->mu);
    int ok = !r->closing;
    r->active += ok;
    pthread_mutex_unlock(&r->mu);
    return ok ? 0 : -1;
}

static void leave(Reader *r)
{
    pthread_mutex_lock(&r->mu);
    if (--r->active == 0 && r->closing)
        pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

static PyObject *closed_error(void)
{
    PyErr_SetString(PyExc_ValueError, "reader is closed");
    return NULL;
}

static PyObject *Reader_fetch(Reader *r, PyObject *args)
{
    double timeout = 0.2, shed_after = 0.25;
    Py_ssize_t max_items = 1024;
    if (!PyArg_ParseTuple(args, "|dnd", &timeout, &max_items, &shed_after))
        return NULL;
    /* A negative, NaN or infinite time would make the wait below fail at once (EINVAL) and
     * spin with the mutex held, or overflow the conversion to nanoseconds. */
    if (!isfinite(timeout) || timeout < 0 || !isfinite(shed_after) || shed_after < 0) {
        PyErr_SetString(PyExc_ValueError, "fetch(): timeout_s and shed_after_s must be finite and >= 0");
        return NULL;
    }
    if (timeout > MAX_TIMEOUT_S)
        timeout = MAX_TIMEOUT_S;
    if (shed_after > MAX_TIMEOUT_S)
        shed_after = MAX_TIMEOUT_S;
    if (max_items < 1)
        max_items = 1;
    if (r->closed)
        return closed_error();
    pkt_t *got = NULL;
    int refused;
    Py_BEGIN_ALLOW_THREADS refused = enter(r);
    if (!refused) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        long long ns = until.tv_nsec + (long long)(timeout * 1e9);
        until.tv_sec += ns / 1000000000LL;
        until.tv_nsec = ns % 1000000000LL;
        pthread_mutex_lock(&r->mu);
        while (!r->head && !r->thread_done && !r->closing) {
            if (pthread_cond_timedwait(&r->cv, &r->mu, &until) != 0)
                break; /* ETIMEDOUT, or an error: never spin */
        }
        shed_ahead_of_sync(r, (int64_t)(shed_after * 1e9));
        /* Take at most max_items, so that the caller comes back (and sheds) often. */
        got = r->head;
        pkt_t *last = NULL, *p = got;
        for (Py_ssize_t n = 0; p && n < max_items; n++, last = p, p = p->next) {
            if (p->sync) {
                r->sync_waiting--;
            } else {
                r->observe_waiting--;
                r->observe_bytes -= p->len;
            }
        }
        if (last)
            last->next = NULL;
        r->head = p;
        if (!p)
            r->tail = NULL;
        pthread_mutex_unlock(&r->mu);
    }
    Py_END_ALLOW_THREADS if (refused) return closed_error();
    PyObject *out = PyList_New(0);
    while (got) {
        pkt_t *p = got;
        got = p->next;
        if (out) {
            PyObject *item = Py_BuildValue(
                "(y#OLNI)", (const char *)p->data, (Py_ssize_t)p->len, p->outgoing ? Py_True : Py_False,
                (long long)p->ts_ns, p->sync ? PyLong_FromUnsignedLongLong(ticket(r, p)) : Py_NewRef(Py_None),
                (unsigned int)p->lost);
            if (!item || PyList_Append(out, item) < 0) {
                Py_XDECREF(item);
                Py_CLEAR(out);
            } else {
                Py_DECREF(item);
            }
        }
        if (!out && p->sync) /* out of memory: the packet must still get a verdict */
            send_verdict(r, NFQNL_MSG_VERDICT, p->queue, htonl(p->id));
        free(p);
    }
    leave(r); /* after the last use of the socket */
    return out;
}

static PyObject *bad_ticket(void)
{
    PyErr_SetString(PyExc_ValueError, "not a packet id fetch() gave");
    return NULL;
}

static PyObject *Reader_verdict(Reader *r, PyObject *args)
{
    unsigned long long id;
    Py_buffer payload = {0};
    PyObject *pobj;
    unsigned long mark = 0;
    if (!PyArg_ParseTuple(args, "KO|k", &id, &pobj, &mark))
        return NULL;
    if (r->closed)
        return closed_error();
    int queue = ticket_queue(r, id);
    if (queue < 0)
        return bad_ticket();
    if (pobj != Py_None && PyObject_GetBuffer(pobj, &payload, PyBUF_SIMPLE) < 0)
        return NULL;
    if (pobj != Py_None && payload.len > MAX_PAYLOAD) {
        PyBuffer_Release(&payload);
        return PyErr_Format(PyExc_ValueError,
                            "verdict payload of %zd bytes: at most %d fit in a netlink attribute",
                            payload.len, (int)MAX_PAYLOAD);
    }
    int err;
    Py_BEGIN_ALLOW_THREADS err =
        enter(r) ? -EBADF
                 : send_verdict_msg(r->fd, NFQNL_MSG_VERDICT, (uint16_t)queue, htonl((uint32_t)id), NF_ACCEPT,
                                    (uint32_t)mark, payload.buf, (size_t)payload.len);
    if (err != -EBADF)
        leave(r);
    Py_END_ALLOW_THREADS PyBuffer_Release(&payload);
    if (err == -EBADF)
        return closed_error();
    if (err == -ENOMEM)
        return PyErr_NoMemory();
    __atomic_fetch_add(err ? &r->send_errors : &r->verdicts, 1, __ATOMIC_RELAXED);
    if (err) {
        errno = -err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Reader_drop(Reader *r, PyObject *args)
{
    unsigned long long id;
    if (!PyArg_ParseTuple(args, "K", &id))
        return NULL;
    if (r->closed)
        return closed_error();
    int queue = ticket_queue(r, id);
    if (queue < 0)
        return bad_ticket();
    int err;
    Py_BEGIN_ALLOW_THREADS err = enter(r) ? -EBADF
                                          : send_verdict_msg(r->fd, NFQNL_MSG_VERDICT, (uint16_t)queue,
                                                             htonl((uint32_t)id), NF_DROP, 0, NULL, 0);
    if (err != -EBADF)
        leave(r);
    Py_END_ALLOW_THREADS if (err == -EBADF) return closed_error();
    __atomic_fetch_add(err ? &r->send_errors : &r->drops, 1, __ATOMIC_RELAXED);
    if (err) {
        errno = -err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Reader_take_lost(Reader *r, PyObject *Py_UNUSED(ignored))
{
    pthread_mutex_lock(&r->mu);
    uint32_t lost = r->lost_pending;
    r->lost_pending = 0;
    pthread_mutex_unlock(&r->mu);
    return PyLong_FromUnsignedLong(lost);
}

static PyObject *Reader_stats(Reader *r, PyObject *Py_UNUSED(ignored))
{
    pthread_mutex_lock(&r->mu);
    uint64_t v[] = {r->received,
                    r->observed,
                    r->observe_dropped,
                    r->observe_shed,
                    r->acks_skipped,
                    r->sync,
                    __atomic_load_n(&r->verdicts, __ATOMIC_RELAXED),
                    __atomic_load_n(&r->send_errors, __ATOMIC_RELAXED),
                    r->recv_errors,
                    r->overruns,
                    r->truncated,
                    r->unparsed,
                    r->observe_waiting,
                    r->foreign,
                    __atomic_load_n(&r->drops, __ATOMIC_RELAXED)};
    int running = r->thread_started && !r->thread_done;
    pthread_mutex_unlock(&r->mu);
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsO}", "received", v[0], "observed", v[1],
                         "observe_dropped", v[2], "observe_shed", v[3], "acks_skipped", v[4], "sync", v[5],
                         "verdicts", v[6], "send_errors", v[7], "recv_errors", v[8], "overruns", v[9],
                         "truncated", v[10], "unparsed", v[11], "observe_waiting", v[12], "foreign", v[13],
                         "drops", v[14], "running", running ? Py_True : Py_False);
}

static PyObject *Reader_close(Reader *r, PyObject *Py_UNUSED(ignored))
{
    reader_close(r);
    Py_RETURN_NONE;
}

static PyMethodDef Reader_methods[] = {
    {"fetch", (PyCFunction)Reader_fetch, METH_VARARGS,
     "fetch(timeout_s=0.2, max_items=1024, shed_after_s=0.25) -> list of (data, outgoing, ts_ns, packet_id "
     "or None,"
     " lost); [] after the timeout"},
    {"verdict", (PyCFunction)Reader_verdict, METH_VARARGS,
     "verdict(packet_id, payload or None, mark=0): accept a sync packet, with new bytes / mark if given"},
    {"drop", (PyCFunction)Reader_drop, METH_VARARGS,
     "drop(packet_id): NF_DROP for a sync packet whose changed bytes could not be sent (TCP retransmits it)"},
    {"take_lost", (PyCFunction)Reader_take_lost, METH_NOARGS,
     "observed packets lost since the last one fetch() returned (no packet came after them to carry the "
     "count)"},
    {"stats", (PyCFunction)Reader_stats, METH_NOARGS, "counters of the reader"},
    {"close", (PyCFunction)Reader_close, METH_NOARGS,
     "stop the thread, accept unfetched sync packets, unbind"},
    {NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "obi.fallback._nfq.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "NFQUEUE reader bound to a sync queue (Python decides) and an observe queue (accepted at once)",
    .tp_new = Reader_new,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_methods = Reader_methods,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "obi.fallback._nfq",
                                    .m_doc = "NFQUEUE reader of the userspace datapath", .m_size = -1};

PyMODINIT_FUNC PyInit__nfq(void)
{
    if (PyType_Ready(&ReaderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&ReaderType);
    if (PyModule_AddObject(m, "Reader", (PyObject *)&ReaderType) < 0) {
        Py_DECREF(&ReaderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
