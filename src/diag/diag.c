#include "diag.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void hm_line_str(struct hm_line *l, const char *s)
{
    while (*s && l->len < sizeof l->buf)
        l->buf[l->len++] = *s++;
}

void hm_line_u64(struct hm_line *l, uint64_t v, unsigned width)
{
    char tmp[24];
    unsigned n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (width > n && l->len < sizeof l->buf) {
        l->buf[l->len++] = ' ';
        width--;
    }
    while (n && l->len < sizeof l->buf)
        l->buf[l->len++] = tmp[--n];
}

void hm_line_hex(struct hm_line *l, uintptr_t v)
{
    char tmp[16];
    unsigned n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    hm_line_str(l, "0x");
    while (n && l->len < sizeof l->buf)
        l->buf[l->len++] = tmp[--n];
}

void hm_line_write(struct hm_line *l, int fd)
{
    size_t off = 0;
    while (off < l->len) {
        ssize_t w = write(fd, l->buf + off, l->len - off);
        if (w <= 0)
            break;
        off += (size_t)w;
    }
    l->len = 0;
}

void hm_fatal(const char *call, const char *what, const void *ptr)
{
    struct hm_line l = { .len = 0 };
    hm_line_str(&l, "hakmem: ");
    hm_line_str(&l, call);
    hm_line_str(&l, "(): ");
    hm_line_str(&l, what);
    hm_line_str(&l, " ");
    hm_line_hex(&l, (uintptr_t)ptr);
    hm_line_str(&l, "\n");
    hm_line_write(&l, STDERR_FILENO);
    abort();
}
