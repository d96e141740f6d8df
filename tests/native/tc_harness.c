/* Test harness of the coefficient codec's kernels (scatstore/transforms/_tc_kernels.c) for a
 * cross-built target run under qemu (tests/test_native_cross.py). Usage:
 *   tc_harness reconstruct IN OUT    IN: int64 n, D, N, linear, stride; float32 eps;
 *                                    uint8 u[n*stride]; int32 width[n], nlive[n], comps[n*D];
 *                                    float32 At[D*D], mu[D]
 *                                    OUT: float32 out[n*D*N]
 *   tc_harness quantize IN OUT       IN: int64 n, D, N; float32 eps; float32 x[n*D*N];
 *                                    int32 table[8192], M[D]; float64 A[D*D], s[D]
 *                                    OUT: uint16 u[n*D*N], int32 umax[n]
 *   tc_harness kernel                prints the kernel name
 * Little-endian, no padding between fields. */
#include <stdio.h>
#include <stdlib.h>
#include "../../scatstore/transforms/_tc_kernels.c"

static void *take(FILE *f, size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p || fread(p, 1, n, f) != n) { fprintf(stderr, "short input\n"); exit(2); }
    return p;
}

int main(int argc, char **argv)
{
    if (argc == 2) { puts(tc_kernel()); return 0; }
    if (argc != 4) return 2;
    FILE *f = fopen(argv[2], "rb"), *g = fopen(argv[3], "wb");
    if (!f || !g) return 2;
    if (!strcmp(argv[1], "reconstruct")) {
        int64_t *h = take(f, 5 * 8), n = h[0], D = h[1], N = h[2], stride = h[4];
        float *eps = take(f, 4);
        uint8_t *u = take(f, (size_t)(n * stride));
        int32_t *width = take(f, 4 * n), *nlive = take(f, 4 * n), *comps = take(f, 4 * n * D);
        float *At = take(f, 4 * D * D), *mu = take(f, 4 * D);
        const int64_t nt = (N + tc_tile_columns() - 1) / tc_tile_columns();
        float *qf = calloc((size_t)(D * nt * tc_tile_columns()), 4);
        int32_t *ks = calloc((size_t)(D * nt), 4);
        float *out = calloc((size_t)(n * D * N), 4);
        tc_reconstruct(u, stride, width, n, D, N, nlive, comps, At, mu, *eps, (int)h[3], qf, ks,
                       out);
        fwrite(out, 4, (size_t)(n * D * N), g);
    } else if (!strcmp(argv[1], "quantize")) {
        int64_t *h = take(f, 3 * 8), n = h[0], D = h[1], N = h[2];
        float *eps = take(f, 4);
        float *x = take(f, 4 * n * D * N);
        int32_t *table = take(f, 4 * 8192), *M = take(f, 4 * D);
        double *A = take(f, 8 * D * D), *s = take(f, 8 * D);
        const int64_t tn = tc_quantize_tile_columns(), Np = (N + tn - 1) / tn * tn;
        double *Yd = calloc((size_t)(D * Np), 8);
        uint16_t *u = calloc((size_t)(n * D * N), 2);
        int32_t *umax = calloc((size_t)n, 4);
        tc_quantize(x, n, D, N, *eps, table, M, A, s, Yd, u, umax);
        fwrite(u, 2, (size_t)(n * D * N), g);
        fwrite(umax, 4, (size_t)n, g);
    } else return 2;
    fclose(g);
    return 0;
}
