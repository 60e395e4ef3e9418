/* memset and memcpy for guest.c built as a kernel-style image (no libc): linked at the kernel's
 * addresses (0xffffffff81000000, -mcmodel=kernel) by tests/test_scan_deep.py, so that the deep
 * engine's runs go through its own copies rather than an import stub. */
#include <stddef.h>
void *memset(void *d, int c, size_t n)
{
    unsigned char *p = d;
    while (n--)
        *p++ = (unsigned char)c;
    return d;
}
void *memcpy(void *d, const void *s, size_t n)
{
    unsigned char *p = d;
    const unsigned char *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}
