/* An LD_PRELOAD shim that makes chosen system calls fail, for the fault
 * tests.  It sits at the C library boundary: the engine's preadv/pwritev/
 * fdatasync calls reach it exactly as they would reach the kernel (pread and
 * pwrite are covered too).
 *
 * FM_FAULTS holds rules separated by ';', each
 *     op:path_substring:start:end:errno:count[:skip]
 * op is read, write or flush; a call fails when its descriptor's path
 * contains path_substring and its range overlaps [start, end) (flush: any
 * range); count is how many calls fail before the rule is spent (-1: all);
 * skip (default 0) is how many matching calls go through before the first
 * failure.  flush covers fdatasync(2) and fsync(2).
 * op lossy_flush is a flush that, when it fails, also does what Linux does to
 * a file whose fsync fails: the dirty pages are dropped, so writes made since
 * the file's last successful flush never reach the disk.  Here the worst
 * case: every range written through pwrite to that file (by any descriptor)
 * since its last successful fdatasync/fsync is overwritten with 0xEB bytes,
 * and forgotten; a later successful flush then succeeds without them.
 * op uring_enter fails io_uring_enter(2), made through syscall(3) as the
 * engine's ring does (path, start and end are ignored): the kernel then
 * takes none of the queued entries, as when it is short of memory.
 * FM_FAULTS_LOG, if set, is a file where every injected failure is logged.
 * FM_SHORT_IO=N, if set, makes every preadv/pwritev that gets through
 * transfer at most N bytes, as a short read or write may (the caller must
 * continue where it stopped, inside an iovec too); each such call is logged
 * to FM_FAULTS_LOG as "short op offset".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum { OP_READ, OP_WRITE, OP_FLUSH, OP_URING_ENTER };
struct rule {
    int op; char path[256]; int64_t start, end; int err; int64_t count; int64_t skip;
    int lossy;
};
static struct rule rules[16];
static int nrules = -1;
static int nlossy;               /* lossy_flush rules: writes must be recorded */
static pthread_once_t once = PTHREAD_ONCE_INIT;
static FILE *logf;
static long long short_cap;     /* FM_SHORT_IO */

/* Writes not yet flushed, for lossy_flush: the file (device, inode), the
 * range, and a sequence number to tell those a flush covers. */
struct written { dev_t dev; ino_t ino; int64_t off, len; uint64_t seq; };
static struct written *written;
static size_t nwritten, capwritten;
static uint64_t write_seq;
static pthread_mutex_t written_mu = PTHREAD_MUTEX_INITIALIZER;

static void parse(void)
{
    const char *spec = getenv("FM_FAULTS");
    const char *log = getenv("FM_FAULTS_LOG");
    const char *cap = getenv("FM_SHORT_IO");
    nrules = 0;
    short_cap = cap ? atoll(cap) : 0;
    if (log) logf = fopen(log, "a");
    if (!spec) return;
    char *copy = strdup(spec), *save = NULL;
    for (char *tok = strtok_r(copy, ";", &save); tok && nrules < 16;
         tok = strtok_r(NULL, ";", &save)) {
        struct rule *r = &rules[nrules];
        char op[16];
        long long s, e, c, k = 0;
        int err;
        if (sscanf(tok, "%15[^:]:%255[^:]:%lld:%lld:%d:%lld:%lld", op, r->path, &s, &e, &err,
                   &c, &k) < 6)
            continue;
        r->op = !strcmp(op, "read") ? OP_READ : !strcmp(op, "write") ? OP_WRITE
              : !strcmp(op, "uring_enter") ? OP_URING_ENTER : OP_FLUSH;
        r->lossy = !strcmp(op, "lossy_flush");
        nlossy += r->lossy;
        r->start = s; r->end = e; r->err = err; r->count = c; r->skip = k;
        nrules++;
    }
    free(copy);
}

static int fd_path(int fd, char *path, size_t size)
{
    char link[64];
    ssize_t n;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, size - 1);
    if (n < 0) return -1;
    path[n] = 0;
    return 0;
}

/* The errno a call fails with, 0 for none; *rule is the index of the rule. */
static int should_fail_rule(int op, int fd, int64_t off, int64_t len, int *rule)
{
    char path[512];
    pthread_once(&once, parse);
    for (int i = 0; i < nrules; i++) {
        struct rule *r = &rules[i];
        if (r->op != op) continue;
        if (op != OP_FLUSH && op != OP_URING_ENTER && (off >= r->end || off + len <= r->start))
            continue;
        if (__atomic_load_n(&r->count, __ATOMIC_SEQ_CST) == 0) continue;
        if (op == OP_URING_ENTER) {
            if (r->count > 0 && __atomic_sub_fetch(&r->count, 1, __ATOMIC_SEQ_CST) < 0) continue;
            if (logf) { fprintf(logf, "%d io_uring_enter %d\n", op, r->err); fflush(logf); }
            return r->err;
        }
        if (fd_path(fd, path, sizeof path) < 0) continue;
        if (!strstr(path, r->path)) continue;
        if (__atomic_load_n(&r->skip, __ATOMIC_SEQ_CST) > 0
                && __atomic_sub_fetch(&r->skip, 1, __ATOMIC_SEQ_CST) >= 0)
            continue;
        if (r->count > 0 && __atomic_sub_fetch(&r->count, 1, __ATOMIC_SEQ_CST) < 0) continue;
        if (logf) {
            fprintf(logf, "%d %s %lld %lld %d\n", op, path, (long long)off, (long long)len, r->err);
            fflush(logf);
        }
        if (rule) *rule = i;
        return r->err;
    }
    return 0;
}

static int should_fail(int op, int fd, int64_t off, int64_t len)
{
    return should_fail_rule(op, fd, off, len, NULL);
}

/* After a successful write: remember it if a lossy_flush rule names its file. */
static void record_write(int fd, int64_t off, int64_t len)
{
    char path[512];
    struct stat st;
    int i, match = 0;
    pthread_once(&once, parse);
    if (!nlossy || len <= 0 || fd_path(fd, path, sizeof path) < 0) return;
    for (i = 0; i < nrules; i++)
        match |= rules[i].lossy && strstr(path, rules[i].path) != NULL;
    if (!match || fstat(fd, &st) < 0) return;
    pthread_mutex_lock(&written_mu);
    if (nwritten == capwritten) {
        size_t cap = capwritten ? 2 * capwritten : 1024;
        struct written *w = realloc(written, cap * sizeof *w);
        if (!w) { pthread_mutex_unlock(&written_mu); abort(); }
        written = w;
        capwritten = cap;
    }
    written[nwritten++] = (struct written){st.st_dev, st.st_ino, off, len, write_seq++};
    pthread_mutex_unlock(&written_mu);
}

/* Forget the writes to fd's file with a sequence number below `below`
 * (those a flush covered); with `lose`, overwrite them first, as the pages
 * a failed flush dropped. */
static void settle_writes(int fd, uint64_t below, int lose)
{
    static char junk[65536];
    char link[64];
    struct stat st;
    size_t i, kept = 0;
    int wfd = -1;
    if (fstat(fd, &st) < 0) return;
    if (lose) {
        memset(junk, 0xEB, sizeof junk);
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        wfd = open(link, O_WRONLY | O_CLOEXEC);     /* buffered: any alignment */
    }
    pthread_mutex_lock(&written_mu);
    for (i = 0; i < nwritten; i++) {
        struct written *w = &written[i];
        if (w->dev != st.st_dev || w->ino != st.st_ino || w->seq >= below) {
            written[kept++] = *w;
            continue;
        }
        if (wfd >= 0) {
            static ssize_t (*real)(int, const void *, size_t, off_t);
            int64_t done = 0, n;
            if (!real) real = dlsym(RTLD_NEXT, "pwrite64");
            while (done < w->len) {
                n = w->len - done < (int64_t)sizeof junk ? w->len - done : (int64_t)sizeof junk;
                if (real(wfd, junk, n, w->off + done) != n) break;
                done += n;
            }
            if (logf) {
                fprintf(logf, "lost %lld %lld\n", (long long)w->off, (long long)w->len);
                fflush(logf);
            }
        }
    }
    nwritten = kept;
    pthread_mutex_unlock(&written_mu);
    if (wfd >= 0) close(wfd);
}

static int flush_call(int fd, int (*real)(int))
{
    uint64_t seq;
    int rule = -1, e, r;
    pthread_mutex_lock(&written_mu);
    seq = write_seq;             /* writes recorded so far were made before this flush */
    pthread_mutex_unlock(&written_mu);
    e = should_fail_rule(OP_FLUSH, fd, 0, 0, &rule);
    if (e) {
        if (rule >= 0 && rules[rule].lossy) settle_writes(fd, UINT64_MAX, 1);
        errno = e;
        return -1;
    }
    r = real(fd);
    if (r == 0 && nlossy) settle_writes(fd, seq, 0);
    return r;
}

#define REAL(name, ret, ...) \
    static ret (*real_##name)(__VA_ARGS__); \
    if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name)

ssize_t pread(int fd, void *buf, size_t n, off_t off)
{
    REAL(pread, ssize_t, int, void *, size_t, off_t);
    int e = should_fail(OP_READ, fd, off, n);
    if (e) { errno = e; return -1; }
    return real_pread(fd, buf, n, off);
}

ssize_t pread64(int fd, void *buf, size_t n, off_t off)
{
    REAL(pread64, ssize_t, int, void *, size_t, off_t);
    int e = should_fail(OP_READ, fd, off, n);
    if (e) { errno = e; return -1; }
    return real_pread64(fd, buf, n, off);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
    REAL(pwrite, ssize_t, int, const void *, size_t, off_t);
    int e = should_fail(OP_WRITE, fd, off, n);
    ssize_t r;
    if (e) { errno = e; return -1; }
    r = real_pwrite(fd, buf, n, off);
    if (r > 0) record_write(fd, off, r);
    return r;
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off)
{
    REAL(pwrite64, ssize_t, int, const void *, size_t, off_t);
    int e = should_fail(OP_WRITE, fd, off, n);
    ssize_t r;
    if (e) { errno = e; return -1; }
    r = real_pwrite64(fd, buf, n, off);
    if (r > 0) record_write(fd, off, r);
    return r;
}

static int64_t iov_total(const struct iovec *iov, int n)
{
    int64_t t = 0;
    for (int i = 0; i < n; i++)
        t += (int64_t)iov[i].iov_len;
    return t;
}

/* The first iovecs of iov[0..n), the last one trimmed, holding at most
 * FM_SHORT_IO bytes (copied to part[]); n itself when FM_SHORT_IO is unset. */
static int short_io(const struct iovec *iov, int n, struct iovec *part, int max)
{
    int k = 0;
    pthread_once(&once, parse);
    if (short_cap <= 0 || iov_total(iov, n) <= short_cap)
        return -1;
    for (long long left = short_cap; k < n && k < max && left > 0; k++) {
        part[k] = iov[k];
        if ((long long)part[k].iov_len > left)
            part[k].iov_len = (size_t)left;
        left -= (long long)part[k].iov_len;
    }
    return k;
}

#define VECTORED(name, op, iovtype) \
ssize_t name(int fd, iovtype *iov, int n, off_t off) \
{ \
    REAL(name, ssize_t, int, iovtype *, int, off_t); \
    struct iovec part[64]; \
    int e = should_fail(op, fd, off, iov_total(iov, n)); \
    if (e) { errno = e; return -1; } \
    int k = short_io(iov, n, part, 64); \
    if (k >= 0 && logf) { fprintf(logf, "short %d %lld\n", op, (long long)off); fflush(logf); } \
    return k < 0 ? real_##name(fd, iov, n, off) : real_##name(fd, part, k, off); \
}
VECTORED(preadv, OP_READ, const struct iovec)
VECTORED(preadv64, OP_READ, const struct iovec)
VECTORED(pwritev, OP_WRITE, const struct iovec)
VECTORED(pwritev64, OP_WRITE, const struct iovec)

int fdatasync(int fd)
{
    REAL(fdatasync, int, int);
    return flush_call(fd, real_fdatasync);
}

int fsync(int fd)
{
    REAL(fsync, int, int);
    return flush_call(fd, real_fsync);
}

long syscall(long nr, ...)
{
    REAL(syscall, long, long, ...);
    va_list ap;
    long a[6];
    va_start(ap, nr);
    for (int i = 0; i < 6; i++)
        a[i] = va_arg(ap, long);
    va_end(ap);
#ifdef SYS_io_uring_enter
    if (nr == SYS_io_uring_enter) {
        int e = should_fail(OP_URING_ENTER, -1, 0, 0);
        if (e) { errno = e; return -1; }
    }
#endif
    return real_syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
}
