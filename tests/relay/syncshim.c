/* An LD_PRELOAD journal of what makes a message durable, for the durability tests.
 *
 * Loaded into the relay (LD_PRELOAD=syncshim.so), it appends one line per event to the file
 * named by SYNCSHIM_LOG:
 *
 *   <seq> create <ino> <path>             open/openat with O_CREAT succeeded
 *   <seq> fsync|fdatasync <ino> <snap> <path>
 *                                          the call returned 0; <snap> names the copy of the
 *                                          file's content (or, for a directory, of its listing:
 *                                          "<ino> <name>" lines) taken just before the call,
 *                                          stored under SYNCSHIM_SNAP
 *   <seq> rename <old> <new>               rename/renameat/renameat2 succeeded
 *   <seq> reply <fd> <queue-id>            a write to a socket carried "queued as <queue-id>"
 *
 * <seq> is taken when the event completes, from one counter shared by every thread, so the
 * lines sorted by <seq> are the order in which the calls returned. The tests read the journal
 * to check the order of a commit's steps, and rebuild the disk as a power cut would leave it
 * (only synced content and directory entries made durable by a directory fsync survive).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static unsigned long seq_counter;
static unsigned long snap_counter;
static int log_fd = -1;
static __thread int busy; /* the shim's own calls are not journalled */

#define REAL(name) static __typeof__(name) *real_##name
REAL(open); REAL(open64); REAL(openat); REAL(openat64); REAL(fsync); REAL(fdatasync);
REAL(rename); REAL(renameat); REAL(renameat2); REAL(write); REAL(writev); REAL(send);
REAL(sendto); REAL(sendmsg);

__attribute__((constructor)) static void init(void) {
#define LOAD(name) real_##name = dlsym(RTLD_NEXT, #name)
    LOAD(open); LOAD(open64); LOAD(openat); LOAD(openat64); LOAD(fsync); LOAD(fdatasync);
    LOAD(rename); LOAD(renameat); LOAD(renameat2); LOAD(write); LOAD(writev); LOAD(send);
    LOAD(sendto); LOAD(sendmsg);
    const char *path = getenv("SYNCSHIM_LOG");
    if (path) log_fd = real_open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
}

static void emit(const char *fmt, ...) {
    if (log_fd < 0) return;
    char line[PATH_MAX * 2 + 128];
    unsigned long seq = __atomic_add_fetch(&seq_counter, 1, __ATOMIC_SEQ_CST);
    int n = snprintf(line, sizeof line, "%lu ", seq);
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof line - n, fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof line - 1) n = sizeof line - 2;
    line[n++] = '\n';
    real_write(log_fd, line, n); /* O_APPEND: one write, one whole line */
}

static void fd_path(int fd, char *out, size_t size) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, size - 1);
    out[n < 0 ? 0 : n] = 0;
}

/* Copy what the fd holds now (file bytes, or a directory listing) to SYNCSHIM_SNAP/<id>. */
static unsigned long snapshot(int fd, int is_dir) {
    const char *dir = getenv("SYNCSHIM_SNAP");
    if (!dir) return 0;
    unsigned long id = __atomic_add_fetch(&snap_counter, 1, __ATOMIC_SEQ_CST);
    char target[PATH_MAX];
    snprintf(target, sizeof target, "%s/%lu", dir, id);
    int out = real_open(target, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (out < 0) return 0;
    char src[64];
    snprintf(src, sizeof src, "/proc/self/fd/%d", fd);
    if (is_dir) {
        DIR *d = opendir(src);
        struct dirent *e;
        char line[NAME_MAX + 32];
        while (d && (e = readdir(d))) {
            if (e->d_name[0] == '.' && (!e->d_name[1] || (e->d_name[1] == '.' && !e->d_name[2])))
                continue;
            int n = snprintf(line, sizeof line, "%lu %s\n", (unsigned long)e->d_ino, e->d_name);
            real_write(out, line, n);
        }
        if (d) closedir(d);
    } else {
        int in = real_open(src, O_RDONLY | O_CLOEXEC);
        char buf[65536];
        ssize_t n;
        while (in >= 0 && (n = read(in, buf, sizeof buf)) > 0) real_write(out, buf, n);
        if (in >= 0) close(in);
    }
    close(out);
    return id;
}

static int synced(const char *what, int fd, int (*call)(int)) {
    if (busy) return call(fd);
    busy = 1;
    struct stat st;
    int have = fstat(fd, &st) == 0;
    unsigned long snap = have ? snapshot(fd, S_ISDIR(st.st_mode)) : 0;
    int rc = call(fd);
    int saved = errno;
    if (rc == 0 && have) {
        char path[PATH_MAX];
        fd_path(fd, path, sizeof path);
        emit("%s %lu %lu %s", what, (unsigned long)st.st_ino, snap, path);
    }
    busy = 0;
    errno = saved;
    return rc;
}

int fsync(int fd) { return synced("fsync", fd, real_fsync); }
int fdatasync(int fd) { return synced("fdatasync", fd, real_fdatasync); }

static void created(int fd, int flags) {
    if (fd < 0 || !(flags & O_CREAT) || busy) return;
    busy = 1;
    int saved = errno;
    struct stat st;
    if (fstat(fd, &st) == 0) {
        char path[PATH_MAX];
        fd_path(fd, path, sizeof path);
        emit("create %lu %s", (unsigned long)st.st_ino, path);
    }
    errno = saved;
    busy = 0;
}

#define OPEN_MODE(flags, mode)                     \
    mode_t mode = 0;                               \
    if ((flags) & (O_CREAT | __O_TMPFILE)) {       \
        va_list ap;                                \
        va_start(ap, flags);                       \
        mode = va_arg(ap, mode_t);                 \
        va_end(ap);                                \
    }

int open(const char *path, int flags, ...) {
    OPEN_MODE(flags, mode);
    int fd = real_open(path, flags, mode);
    created(fd, flags);
    return fd;
}
int open64(const char *path, int flags, ...) {
    OPEN_MODE(flags, mode);
    int fd = real_open64(path, flags, mode);
    created(fd, flags);
    return fd;
}
int openat(int dirfd, const char *path, int flags, ...) {
    OPEN_MODE(flags, mode);
    int fd = real_openat(dirfd, path, flags, mode);
    created(fd, flags);
    return fd;
}
int openat64(int dirfd, const char *path, int flags, ...) {
    OPEN_MODE(flags, mode);
    int fd = real_openat64(dirfd, path, flags, mode);
    created(fd, flags);
    return fd;
}

static void renamed(int rc, int olddir, const char *old, int newdir, const char *new) {
    if (rc != 0 || busy) return;
    int saved = errno;
    char a[PATH_MAX], b[PATH_MAX];
    if (old[0] != '/' && olddir != AT_FDCWD) {
        char d[PATH_MAX];
        fd_path(olddir, d, sizeof d);
        snprintf(a, sizeof a, "%s/%s", d, old);
    } else {
        snprintf(a, sizeof a, "%s", old);
    }
    if (new[0] != '/' && newdir != AT_FDCWD) {
        char d[PATH_MAX];
        fd_path(newdir, d, sizeof d);
        snprintf(b, sizeof b, "%s/%s", d, new);
    } else {
        snprintf(b, sizeof b, "%s", new);
    }
    emit("rename %s %s", a, b);
    errno = saved;
}

int rename(const char *old, const char *new) {
    int rc = real_rename(old, new);
    renamed(rc, AT_FDCWD, old, AT_FDCWD, new);
    return rc;
}
int renameat(int od, const char *old, int nd, const char *new) {
    int rc = real_renameat(od, old, nd, new);
    renamed(rc, od, old, nd, new);
    return rc;
}
int renameat2(int od, const char *old, int nd, const char *new, unsigned int flags) {
    int rc = real_renameat2(od, old, nd, new, flags);
    renamed(rc, od, old, nd, new);
    return rc;
}

/* Called before the bytes leave: a reply logged here was not yet on the wire. */
static void replies(int fd, const void *buf, size_t len) {
    static const char key[] = "queued as ";
    if (busy || len < sizeof key) return;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) return;
    const char *p = buf, *end = p + len;
    while ((p = memmem(p, end - p, key, sizeof key - 1))) {
        p += sizeof key - 1;
        const char *q = p;
        while (q < end && *q != '\r' && *q != '\n' && *q != ' ') q++;
        emit("reply %d %.*s", fd, (int)(q - p), p);
    }
}

ssize_t write(int fd, const void *buf, size_t n) {
    replies(fd, buf, n);
    return real_write(fd, buf, n);
}
ssize_t send(int fd, const void *buf, size_t n, int flags) {
    replies(fd, buf, n);
    return real_send(fd, buf, n, flags);
}
ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *a,
               socklen_t al) {
    replies(fd, buf, n);
    return real_sendto(fd, buf, n, flags, a, al);
}
ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    for (int i = 0; i < cnt; i++) replies(fd, iov[i].iov_base, iov[i].iov_len);
    return real_writev(fd, iov, cnt);
}
ssize_t sendmsg(int fd, const struct msghdr *m, int flags) {
    for (size_t i = 0; i < m->msg_iovlen; i++)
        replies(fd, m->msg_iov[i].iov_base, m->msg_iov[i].iov_len);
    return real_sendmsg(fd, m, flags);
}
