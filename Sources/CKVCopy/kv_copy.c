#define _GNU_SOURCE
#include "kv_copy.h"
#include <errno.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/vfs.h>
#include <sys/uio.h>
#include <unistd.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <emmintrin.h>

void kv_copy_streaming(void *dst, const void *src, size_t n) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    /* Head: bring the destination to a 64-byte boundary with an ordinary copy. */
    size_t head = (64 - ((uintptr_t)d & 63)) & 63;
    if (head > n) head = n;
    memcpy(d, s, head);
    d += head; s += head; n -= head;
    while (n >= 128) {
        _mm_prefetch((const char *)s + 1024, _MM_HINT_NTA);
        __m128i a0 = _mm_loadu_si128((const __m128i *)(s + 0));
        __m128i a1 = _mm_loadu_si128((const __m128i *)(s + 16));
        __m128i a2 = _mm_loadu_si128((const __m128i *)(s + 32));
        __m128i a3 = _mm_loadu_si128((const __m128i *)(s + 48));
        __m128i a4 = _mm_loadu_si128((const __m128i *)(s + 64));
        __m128i a5 = _mm_loadu_si128((const __m128i *)(s + 80));
        __m128i a6 = _mm_loadu_si128((const __m128i *)(s + 96));
        __m128i a7 = _mm_loadu_si128((const __m128i *)(s + 112));
        _mm_stream_si128((__m128i *)(d + 0), a0);
        _mm_stream_si128((__m128i *)(d + 16), a1);
        _mm_stream_si128((__m128i *)(d + 32), a2);
        _mm_stream_si128((__m128i *)(d + 48), a3);
        _mm_stream_si128((__m128i *)(d + 64), a4);
        _mm_stream_si128((__m128i *)(d + 80), a5);
        _mm_stream_si128((__m128i *)(d + 96), a6);
        _mm_stream_si128((__m128i *)(d + 112), a7);
        s += 128; d += 128; n -= 128;
    }
    /* Streaming stores are weakly ordered: fence before anyone may see the bytes. */
    _mm_sfence();
    memcpy(d, s, n);
}

#else

void kv_copy_streaming(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }

#endif

long kv_process_vm_copy(int pid, int write, void *const *local, void *const *remote, const size_t *lengths, size_t count) {
    if (count > 1024) { errno = EINVAL; return -1; }
    struct iovec l[1024], r[1024];
    for (size_t i = 0; i < count; i++) {
        l[i].iov_base = local[i];
        l[i].iov_len = lengths[i];
        r[i].iov_base = remote[i];
        r[i].iov_len = lengths[i];
    }
    ssize_t n = write ? process_vm_writev(pid, l, count, r, count, 0) : process_vm_readv(pid, l, count, r, count, 0);
    return (long)n;
}

long kv_send_fd(int sock, int fd, const void *data, size_t len) {
    struct iovec iov = {(void *)data, len};
    union { struct cmsghdr h; char space[CMSG_SPACE(sizeof(int))]; } control;
    memset(&control, 0, sizeof control);
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.space;
    msg.msg_controllen = sizeof control.space;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    ssize_t n;
    do { n = sendmsg(sock, &msg, MSG_NOSIGNAL); } while (n < 0 && errno == EINTR);
    return (long)n;
}

long kv_recv_fd(int sock, int *fd, void *data, size_t cap) {
    *fd = -1;
    struct iovec iov = {data, cap};
    union { struct cmsghdr h; char space[CMSG_SPACE(4 * sizeof(int))]; } control;
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.space;
    msg.msg_controllen = sizeof control.space;
    ssize_t n;
    do { n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC); } while (n < 0 && errno == EINTR);
    if (n < 0) return -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
            int got;
            memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            if (*fd < 0) *fd = got; else close(got);   /* one descriptor is expected */
        }
    }
    if (msg.msg_flags & MSG_CTRUNC) { if (*fd >= 0) close(*fd); *fd = -1; errno = EMSGSIZE; return -1; }
    return (long)n;
}

long kv_fs_type(int fd) {
    struct statfs fs;
    return fstatfs(fd, &fs) == 0 ? (long)fs.f_type : -1;
}
