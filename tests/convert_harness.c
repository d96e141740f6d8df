/* Runs the loader's conversion kernels (scatstore/loaders/_convert.c) on fixed inputs and writes
 * the results to stdout, for tests/test_loaders.py to compare with torch / numpy on the host:
 * built for another target (aarch64 NEON, with Debian's cross compiler) and run under qemu-user.
 *
 * Output, little-endian, in order: the kernel name (64 bytes, NUL padded); 65536 float32 (every
 * binary16 bit pattern converted); 3000 float32 (cv_gather_f16_to_f32 of halves k*7 + 1, 30
 * samples of 100 from offsets 200*k bytes); 6 * 784 float32 (cv_u8_affine of q = i % 251,
 * a[m] = 0.01 * (m + 1), b[m] = m - 2.5, 6 maps); same for cv_u8_sqrt; same for cv_u8_norm with
 * a = 1/255, b[m] = 0.1 * m, c[m] = 0.2 + 0.05 * m. */
#include <stdio.h>
#include <stdlib.h>
#include "_convert.c"

int main(void)
{
    char name[64] = {0};
    strncpy(name, cv_kernel(), 63);
    fwrite(name, 1, 64, stdout);
    uint16_t *h = malloc(65536 * 2);
    float *f = malloc(65536 * 4);
    for (int i = 0; i < 65536; i++) h[i] = (uint16_t)i;
    cv_f16_to_f32(h, f, 65536);
    fwrite(f, 4, 65536, stdout);
    uint16_t src[3000 * 2];
    for (int i = 0; i < 6000; i++) src[i] = (uint16_t)(i * 7 + 1);
    float g[3000];
    int64_t off[30], dst[30];
    for (int k = 0; k < 30; k++) { off[k] = 200 * k; dst[k] = (int64_t)(intptr_t)(g + 100 * k); }
    cv_gather_f16_to_f32((const uint8_t *)src, off, dst, 30, 100);
    fwrite(g, 4, 3000, stdout);
    uint8_t q[6 * 784];
    float a[6], b[6], c[6], out[6 * 784];
    for (int i = 0; i < 6 * 784; i++) q[i] = (uint8_t)(i % 251);
    for (int m = 0; m < 6; m++) { a[m] = 0.01f * (m + 1); b[m] = m - 2.5f; c[m] = 0.2f + 0.05f * m; }
    cv_u8_affine(q, out, a, b, 6, 784);
    fwrite(out, 4, 6 * 784, stdout);
    cv_u8_sqrt(q, out, a, b, 6, 784);
    fwrite(out, 4, 6 * 784, stdout);
    for (int m = 0; m < 6; m++) b[m] = 0.1f * m;
    cv_u8_norm(q, out, 1.0f / 255.0f, b, c, 6, 784);
    fwrite(out, 4, 6 * 784, stdout);
    free(h);
    free(f);
    return 0;
}
