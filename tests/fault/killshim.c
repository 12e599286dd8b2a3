/* Fault injector: SIGKILL this process at its N-th file-changing call.
 *
 * LD_PRELOAD=killshim.so KILL_AT=N  : the N-th (1-based) call of pwrite/pwrite64/write (to a regular
 *                                     file), fsync/fdatasync or rename/renameat kills the process
 *                                     before the call runs.
 * COUNT_TO=PATH                     : at exit, write the number of such calls made to PATH.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

static long count = 0, kill_at = -1;

static void tick(void) {
    if (kill_at < 0) {
        const char *s = getenv("KILL_AT");
        kill_at = s ? atol(s) : 0;
    }
    count++;
    if (kill_at > 0 && count == kill_at) kill(getpid(), SIGKILL);
}

static int regular(int fd) {
    struct stat st;
    return fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
}

__attribute__((destructor)) static void report(void) {
    const char *path = getenv("COUNT_TO");
    if (!path) return;
    FILE *f = fopen(path, "w");
    if (f) { fprintf(f, "%ld\n", count); fclose(f); }
}

#define REAL(name, ret, ...) static ret (*real_##name)(__VA_ARGS__); if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name)

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    REAL(pwrite, ssize_t, int, const void *, size_t, off_t);
    tick();
    return real_pwrite(fd, buf, n, off);
}
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    REAL(pwrite64, ssize_t, int, const void *, size_t, off_t);
    tick();
    return real_pwrite64(fd, buf, n, off);
}
ssize_t write(int fd, const void *buf, size_t n) {
    REAL(write, ssize_t, int, const void *, size_t);
    if (regular(fd)) tick();
    return real_write(fd, buf, n);
}
int fsync(int fd) { REAL(fsync, int, int); tick(); return real_fsync(fd); }
int fdatasync(int fd) { REAL(fdatasync, int, int); tick(); return real_fdatasync(fd); }
int rename(const char *a, const char *b) { REAL(rename, int, const char *, const char *); tick(); return real_rename(a, b); }
int renameat(int da, const char *a, int db, const char *b) {
    REAL(renameat, int, int, const char *, int, const char *);
    tick();
    return real_renameat(da, a, db, b);
}
