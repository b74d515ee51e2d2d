// Fill fresh anonymous memory with a file's bytes, two ways, timed (wall and CPU):
//  read:  MADV_POPULATE_WRITE (the kernel zeroes each page) then pread into it;
//  uffd:  register the memory with userfaultfd, map the file (MAP_POPULATE, read-only,
//         shared), UFFDIO_COPY from the mapping into the missing pages (no zeroing), then
//         unregister.
// usage: uffd_copy FILE MODE(read|uffd) [CHUNK_MIB]
//   NOPOP=1: map the file without MAP_POPULATE (its pages fault in during the copies);
//   EXTRA_MIB=N: map N MiB past the file's end (uffd: the copy fails with EFAULT, no SIGBUS).
// Build and run (docs/BENCHMARKS.md, "Host pages, fourth pass"):
//   cc -O2 -o /tmp/uffd_copy benches/fill/uffd_copy.c
//   head -c 1G /dev/urandom > /tmp/big.bin; cat /tmp/big.bin > /dev/null
//   for i in 1 2 3 4 5 6; do /tmp/uffd_copy /tmp/big.bin read; /tmp/uffd_copy /tmp/big.bin uffd; done
// userfaultfd needs vm.unprivileged_userfaultfd=1, CAP_SYS_PTRACE, or access to /dev/userfaultfd.
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

static double now(clockid_t c) {
    struct timespec t;
    clock_gettime(c, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    size_t chunk = (argc > 3 ? atol(argv[3]) : 2) << 20;
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    fstat(fd, &st);
    size_t len = ((st.st_size + 4095) & ~4095UL) + (getenv("EXTRA_MIB") ? (size_t)atol(getenv("EXTRA_MIB")) << 20 : 0);
    double w0 = now(CLOCK_MONOTONIC), c0 = now(CLOCK_PROCESS_CPUTIME_ID);
    char *dst = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    madvise(dst, len, MADV_NOHUGEPAGE);
    if (strcmp(argv[2], "read") == 0) {
        for (size_t at = 0; at < len; at += chunk) {
            size_t n = len - at < chunk ? len - at : chunk;
            if (madvise(dst + at, n, MADV_POPULATE_WRITE)) { perror("populate"); return 1; }
            ssize_t r = pread(fd, dst + at, n, at);
            if (r < 0) { perror("pread"); return 1; }
        }
    } else {
        int uffd = syscall(SYS_userfaultfd, O_CLOEXEC);
        if (uffd < 0) {
            int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
            uffd = dev < 0 ? -1 : ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC);
        }
        if (uffd < 0) { perror("userfaultfd"); return 1; }
        struct uffdio_api api = {.api = UFFD_API};
        if (ioctl(uffd, UFFDIO_API, &api)) { perror("api"); return 1; }
        struct uffdio_register reg = {.range = {(unsigned long)dst, len}, .mode = UFFDIO_REGISTER_MODE_MISSING};
        if (ioctl(uffd, UFFDIO_REGISTER, &reg)) { perror("register"); return 1; }
        char *src = mmap(NULL, len, PROT_READ, MAP_SHARED | (getenv("NOPOP") ? 0 : MAP_POPULATE), fd, 0);
        if (src == MAP_FAILED) { perror("mmap"); return 1; }
        for (size_t at = 0; at < len; at += chunk) {
            size_t n = len - at < chunk ? len - at : chunk;
            struct uffdio_copy cp = {.dst = (unsigned long)(dst + at), .src = (unsigned long)(src + at), .len = n, .mode = 0};
            if (ioctl(uffd, UFFDIO_COPY, &cp) || cp.copy != (long)n) { perror("copy"); return 1; }
        }
        struct uffdio_range r = {(unsigned long)dst, len};
        ioctl(uffd, UFFDIO_UNREGISTER, &r);
        munmap(src, len);
        close(uffd);
    }
    double w1 = now(CLOCK_MONOTONIC), c1 = now(CLOCK_PROCESS_CPUTIME_ID);
    // Check a few bytes against the file.
    unsigned char b[64];
    for (size_t at = 0; at + 64 <= (size_t)st.st_size; at += (size_t)st.st_size / 7) {
        pread(fd, b, 64, at);
        if (memcmp(b, dst + at, 64)) { fprintf(stderr, "mismatch at %zu\n", at); return 1; }
    }
    printf("%s %.3f s wall, %.3f s cpu, %.2f GB/s\n", argv[2], w1 - w0, c1 - c0, st.st_size / (w1 - w0) / 1e9);
    return 0;
}
