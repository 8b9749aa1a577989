/* A minimal io_uring: one ring per thread, reads and writes only.
 *
 * A ring issues its reads and writes one of three ways (fm_ring.calls):
 * FM_CALLS_PLAIN, IORING_OP_READ/WRITE on an address; FM_CALLS_VECTORED,
 * IORING_OP_READV/WRITEV on one iovec; FM_CALLS_FIXED, READ_FIXED/
 * WRITE_FIXED into buffers registered once with fm_ring_register_buffers(),
 * which spares the kernel looking up and pinning the pages of every request
 * (requests on other memory still go as READ/WRITE).
 *
 * Spoken to through the raw system calls (io_uring_setup, io_uring_enter,
 * io_uring_register), so that neither liburing nor a recent C library is
 * needed to build or to run; the structures come from the kernel's own
 * <linux/io_uring.h>.  Where that header is missing, or the running kernel
 * or a seccomp profile refuses io_uring, fm_ring_init() returns -errno and
 * the caller falls back to blocking preadv/pwritev in threads.
 *
 * Without SQPOLL the kernel reads the submission queue only inside
 * io_uring_enter(), so filling it needs no lock and no barrier but the
 * release store of the tail; the completion queue's tail is read with
 * acquire and its head stored with release, as io_uring(7) says.
 *
 * Every function returns 0 or a count on success and -errno on failure.
 */
#ifndef FASTMIRROR_RING_H
#define FASTMIRROR_RING_H

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>

#include "fm_assert.h"

#if defined(__has_include)
#  if __has_include(<linux/io_uring.h>)
#    include <linux/io_uring.h>
#  endif
#endif

/* IORING_OP_* are enum members; IO_URING_OP_SUPPORTED is the macro that came
   with IORING_OP_READ/WRITE and the probe (Linux 5.6). */
#if defined(IO_URING_OP_SUPPORTED) && defined(__NR_io_uring_setup) && \
    defined(__NR_io_uring_enter) && defined(__NR_io_uring_register)
#define FM_HAVE_URING 1
#else
#define FM_HAVE_URING 0
#endif

#define FM_RING_READ 0
#define FM_RING_WRITE 1

#define FM_CALLS_PLAIN 0       /* IORING_OP_READ / IORING_OP_WRITE */
#define FM_CALLS_VECTORED 1    /* IORING_OP_READV / IORING_OP_WRITEV */
#define FM_CALLS_FIXED 2       /* IORING_OP_READ_FIXED / IORING_OP_WRITE_FIXED */

typedef struct fm_ring {
    int fd;
    unsigned sq_entries;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    void *sqes;            /* struct io_uring_sqe[sq_entries] */
    void *cqes;            /* struct io_uring_cqe[] */
    void *sq_map, *cq_map;
    size_t sq_map_len, cq_map_len, sqes_len;
    unsigned to_submit;    /* prepared, not yet handed to the kernel */
    unsigned in_flight;    /* handed to the kernel, completion not yet reaped */
    int calls;             /* FM_CALLS_* */
    struct iovec *vec;     /* FM_CALLS_VECTORED: one iovec per submission entry */
    struct iovec *reg;     /* FM_CALLS_FIXED: the registered buffers, by index */
    unsigned nreg;
} fm_ring;

#if FM_HAVE_URING

static inline void fm_ring_exit(fm_ring *r)
{
    if (r->fd < 0)
        return;
    if (r->sqes) munmap(r->sqes, r->sqes_len);
    if (r->cq_map) munmap(r->cq_map, r->cq_map_len);
    if (r->sq_map) munmap(r->sq_map, r->sq_map_len);
    close(r->fd);          /* unregisters the buffers, unpins their pages */
    free(r->vec);
    free(r->reg);
    memset(r, 0, sizeof(*r));
    r->fd = -1;
}

static inline int fm_ring_init(fm_ring *r, unsigned entries)
{
    struct io_uring_params p;
    char *sq, *cq;
    memset(r, 0, sizeof(*r));
    r->fd = -1;
    memset(&p, 0, sizeof(p));
    int fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (fd < 0)
        return -errno;
    r->fd = fd;
    r->sq_entries = p.sq_entries;
    r->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if ((p.features & IORING_FEAT_SINGLE_MMAP) && r->cq_map_len > r->sq_map_len)
        r->sq_map_len = r->cq_map_len;
    sq = mmap(NULL, r->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
              fd, IORING_OFF_SQ_RING);
    if (sq == MAP_FAILED)
        goto fail;
    r->sq_map = sq;
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        cq = sq;
    } else {
        cq = mmap(NULL, r->cq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                  fd, IORING_OFF_CQ_RING);
        if (cq == MAP_FAILED)
            goto fail;
        r->cq_map = cq;
    }
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED) {
        r->sqes = NULL;
        goto fail;
    }
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = cq + p.cq_off.cqes;
    return 0;
fail:
    {
        int err = -errno;
        fm_ring_exit(r);       /* unmaps what was mapped, closes fd */
        return err;
    }
}

/* Queue one read or write; -EBUSY when the submission queue is full. */
static inline int fm_ring_prep(fm_ring *r, int op, int fd, void *buf, unsigned len,
                        int64_t off, uint64_t user_data)
{
    unsigned tail = *r->sq_tail;
    unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    struct io_uring_sqe *sqe;
    FM_ASSERT(r->fd >= 0 && tail - head <= r->sq_entries);
    if (tail - head >= r->sq_entries)
        return -EBUSY;
    unsigned idx = tail & *r->sq_mask;
    FM_ASSERT(idx < r->sq_entries);
    sqe = &((struct io_uring_sqe *)r->sqes)[idx];
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = op == FM_RING_WRITE ? IORING_OP_WRITE : IORING_OP_READ;
    sqe->addr = (uint64_t)(uintptr_t)buf;
    sqe->len = len;
    if (r->calls == FM_CALLS_FIXED) {
        unsigned i;
        for (i = 0; i < r->nreg; i++) {
            char *base = (char *)r->reg[i].iov_base;
            if ((char *)buf >= base && (char *)buf + len <= base + r->reg[i].iov_len) {
                sqe->opcode = op == FM_RING_WRITE ? IORING_OP_WRITE_FIXED
                                                  : IORING_OP_READ_FIXED;
                sqe->buf_index = (uint16_t)i;
                break;
            }
        }
    } else if (r->calls == FM_CALLS_VECTORED) {
        /* The iovec is read at submission (IORING_FEAT_SUBMIT_STABLE, Linux
           5.5, older than IORING_OP_READ); one per entry keeps it there
           until then. */
        r->vec[idx].iov_base = buf;
        r->vec[idx].iov_len = len;
        sqe->opcode = op == FM_RING_WRITE ? IORING_OP_WRITEV : IORING_OP_READV;
        sqe->addr = (uint64_t)(uintptr_t)&r->vec[idx];
        sqe->len = 1;
    }
    sqe->fd = fd;
    sqe->off = (uint64_t)off;
    sqe->user_data = user_data;
    r->sq_array[idx] = idx;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    r->to_submit++;
    return 0;
}

/* Hand the prepared entries to the kernel and, if `wait_nr`, wait until a
 * completion is there.  Returns how many entries the kernel took, or -errno:
 * -EAGAIN when it could take none for now (short of memory) and nothing is
 * in flight to wait for; the entries stay queued for the next call. */
static inline int fm_ring_submit(fm_ring *r, unsigned wait_nr)
{
    int taken = 0;
    for (;;) {
        unsigned want = wait_nr && (r->in_flight || r->to_submit) ? 1 : 0;
        unsigned flags = want ? IORING_ENTER_GETEVENTS : 0;
        int n = (int)syscall(__NR_io_uring_enter, r->fd, r->to_submit, want, flags,
                             NULL, 0);
        if (n >= 0) {
            unsigned k = (unsigned)n < r->to_submit ? (unsigned)n : r->to_submit;
            r->to_submit -= k;
            r->in_flight += k;
            taken += (int)k;
            /* Entries left over (the kernel took part of them): go round
               again, unless there is a completion to deal with first. */
            if (r->to_submit == 0 || k == 0 ||
                __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE) != *r->cq_head)
                return taken;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EBUSY) {
            /* The kernel is short of requests: completions must be reaped
               first.  Wait for one only if one can come. */
            if (__atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE) != *r->cq_head)
                return taken;
            if (!wait_nr || r->in_flight == 0)
                return taken ? taken : -EAGAIN;
            n = (int)syscall(__NR_io_uring_enter, r->fd, 0, 1, IORING_ENTER_GETEVENTS, NULL, 0);
            if (n < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY)
                return -errno;
            return taken;
        }
        return -errno;
    }
}

/* Take back the entries prepared but never handed to the kernel (after
 * fm_ring_submit failed for good): their user_data go to out[], at most max;
 * returns how many.  Legal without SQPOLL: the kernel reads the queue only
 * inside io_uring_enter. */
static inline unsigned fm_ring_unqueue(fm_ring *r, uint64_t *out, unsigned max)
{
    unsigned n = 0;
    /* What is taken back must still be in the queue, never consumed by the kernel. */
    FM_ASSERT(*r->sq_tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE) >= r->to_submit);
    while (r->to_submit && n < max) {
        unsigned tail = *r->sq_tail - 1;
        out[n++] = ((struct io_uring_sqe *)r->sqes)[r->sq_array[tail & *r->sq_mask]].user_data;
        __atomic_store_n(r->sq_tail, tail, __ATOMIC_RELEASE);
        r->to_submit--;
    }
    return n;
}

/* Take one completion: 1 and its user_data and result, or 0 if none. */
static inline int fm_ring_reap(fm_ring *r, uint64_t *user_data, int *res)
{
    unsigned head = *r->cq_head;
    if (head == __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE))
        return 0;
    struct io_uring_cqe *cqe = &((struct io_uring_cqe *)r->cqes)[head & *r->cq_mask];
    *user_data = cqe->user_data;
    *res = cqe->res;
    __atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
    if (r->in_flight)
        r->in_flight--;
    return 1;
}

/* Can this ring issue reads and writes the `calls` way?  0 if so,
 * -EOPNOTSUPP if the kernel lacks an opcode, or -errno of the probe
 * (IORING_REGISTER_PROBE, Linux 5.6). */
static inline int fm_ring_supports(fm_ring *r, int calls)
{
    char buf[sizeof(struct io_uring_probe) + 256 * sizeof(struct io_uring_probe_op)];
    struct io_uring_probe *pr = (struct io_uring_probe *)buf;
    int rd = calls == FM_CALLS_FIXED ? IORING_OP_READ_FIXED
           : calls == FM_CALLS_VECTORED ? IORING_OP_READV : IORING_OP_READ;
    int wr = calls == FM_CALLS_FIXED ? IORING_OP_WRITE_FIXED
           : calls == FM_CALLS_VECTORED ? IORING_OP_WRITEV : IORING_OP_WRITE;
    memset(buf, 0, sizeof(buf));
    if (syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_PROBE, pr, 256) < 0)
        return -errno;
    if (pr->last_op < rd || pr->last_op < wr ||
        !(pr->ops[rd].flags & IO_URING_OP_SUPPORTED) ||
        !(pr->ops[wr].flags & IO_URING_OP_SUPPORTED))
        return -EOPNOTSUPP;
    return 0;
}

/* Issue reads and writes the `calls` way from now on.  FM_CALLS_FIXED
 * registers bufs[0..n) (IORING_REGISTER_BUFFERS): the kernel pins their pages
 * once, charged to RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK, so it
 * may answer -ENOMEM (or -EFAULT, -EOPNOTSUPP, -EPERM); on any failure the
 * ring keeps issuing reads and writes as before, and nothing is registered. */
static inline int fm_ring_use(fm_ring *r, int calls, const struct iovec *bufs, unsigned n)
{
    int err = fm_ring_supports(r, calls);
    if (err < 0)
        return err;
    if (calls == FM_CALLS_VECTORED && r->vec == NULL) {
        r->vec = calloc(r->sq_entries, sizeof(struct iovec));
        if (r->vec == NULL)
            return -ENOMEM;
    }
    if (calls == FM_CALLS_FIXED) {
        if (r->nreg)
            return -EBUSY;
        if (n == 0 || n > UINT16_MAX)
            return -EINVAL;
        r->reg = malloc(n * sizeof(struct iovec));
        if (r->reg == NULL)
            return -ENOMEM;
        if (syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_BUFFERS, bufs, n) < 0) {
            err = -errno;
            free(r->reg);
            r->reg = NULL;
            return err;
        }
        memcpy(r->reg, bufs, n * sizeof(struct iovec));
        r->nreg = n;
    }
    r->calls = calls;
    return 0;
}

/* Does this kernel let us use io_uring for reads and writes?  0 if so. */
static inline int fm_ring_probe(void)
{
    fm_ring r;
    int err = fm_ring_init(&r, 4);
    if (err < 0)
        return err;
    err = fm_ring_supports(&r, FM_CALLS_PLAIN);
    fm_ring_exit(&r);
    return err;
}

#else  /* no io_uring at build time */

static inline int fm_ring_init(fm_ring *r, unsigned entries)
{ (void)entries; memset(r, 0, sizeof(*r)); r->fd = -1; return -ENOSYS; }
static inline void fm_ring_exit(fm_ring *r) { (void)r; }
static inline int fm_ring_prep(fm_ring *r, int op, int fd, void *buf, unsigned len,
                        int64_t off, uint64_t user_data)
{ (void)r; (void)op; (void)fd; (void)buf; (void)len; (void)off; (void)user_data; return -ENOSYS; }
static inline int fm_ring_submit(fm_ring *r, unsigned wait_nr) { (void)r; (void)wait_nr; return -ENOSYS; }
static inline unsigned fm_ring_unqueue(fm_ring *r, uint64_t *out, unsigned max)
{ (void)r; (void)out; (void)max; return 0; }
static inline int fm_ring_reap(fm_ring *r, uint64_t *user_data, int *res)
{ (void)r; (void)user_data; (void)res; return 0; }
static inline int fm_ring_probe(void) { return -ENOSYS; }
static inline int fm_ring_supports(fm_ring *r, int calls) { (void)r; (void)calls; return -ENOSYS; }
static inline int fm_ring_use(fm_ring *r, int calls, const struct iovec *bufs, unsigned n)
{ (void)r; (void)calls; (void)bufs; (void)n; return -ENOSYS; }

#endif
#endif
