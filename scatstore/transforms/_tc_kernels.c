/* Reconstruction kernel of the coefficient codec (scatstore/transforms/coefcodec.py).
 *
 * One sample: zigzag codes u (D components x N positions, component-major, uint8) ->
 *
 *     q  = (u >> 1) ^ -(u & 1)                       signed codes
 *     y  = mu + At . q        (At: D x D float32, row d = output channel d, steps folded in)
 *     x  = max(2**y - eps, 0)  (linear domain)   or   x = y  (log domain)
 *
 * written as float32 (D, N). Built by scatstore/_cbuild.py for ONE ISA level chosen from the
 * CPU's features (never from timing); the GCC/Clang vector extension below is as wide as that
 * level's registers (AVX-512: 16 floats, AVX2: 8, NEON / SSE / generic: 4), and the tile of
 * output rows x columns kept in registers is sized to the register file (32 zmm / 16 ymm).
 *
 * The product skips, per 16..64-column tile, the components whose codes are all zero there
 * (after the transform most high components are): the work follows the information, and the
 * result is the same as the full product (a skipped term is exactly 0).
 *
 * 2**y: round-to-nearest split y = i + f, |f| <= 1/2, a degree-6 Taylor polynomial of
 * exp(f ln 2) (relative error < 2e-7, below float32's 6e-8 * a few ulps of the product) times
 * 2**i built in the exponent bits; y is clamped to [-126, 127] (normal floats).
 *
 * Stateless; several threads may run it at once on disjoint outputs (ctypes releases the GIL).
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define TC_VB 64
#define TC_ROWS 6
#define TC_KERNEL "avx512f"
#elif defined(__AVX2__)
#define TC_VB 32
#define TC_ROWS 3
#define TC_KERNEL "avx2"
#elif defined(__aarch64__)
#define TC_VB 16
#define TC_ROWS 6
#define TC_KERNEL "neon"
#else
#define TC_VB 16
#define TC_ROWS 2
#define TC_KERNEL "generic-vec4"
#endif

#define TC_VL (TC_VB / 4)     /* floats per vector */
#define TC_NV 4               /* vectors per tile row */
#define TC_TN (TC_VL * TC_NV) /* columns per tile */

typedef float vf __attribute__((vector_size(TC_VB)));
typedef int32_t vi __attribute__((vector_size(TC_VB)));

const char *tc_kernel(void) { return TC_KERNEL; }
int64_t tc_tile_columns(void) { return TC_TN; }

static inline vf vsplat(float a)
{
    const vf zero = {0};
    return zero + a; /* a scalar operand is broadcast (one vbroadcastss) */
}

static inline vf vload(const float *p)
{
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* lane-wise max / min with masks (C has no vector ?:; the casts reinterpret the bits) */
static inline vf vmax(vf a, vf b)
{
    vi m = a > b;
    return (vf)((m & (vi)a) | (~m & (vi)b));
}

static inline vf vmin(vf a, vf b)
{
    vi m = a < b;
    return (vf)((m & (vi)a) | (~m & (vi)b));
}

static inline vf vexp2(vf y)
{
    const vf lo = vsplat(-126.0f), hi = vsplat(127.0f), magic = vsplat(12582912.0f);
    y = vmin(vmax(y, lo), hi);
    vf r = (y + magic) - magic; /* round to nearest (|y| < 2**22) */
    vf f = (y - r) * vsplat(0.6931471805599453f);
    vf p = vsplat(1.0f / 720.0f);
    p = p * f + vsplat(1.0f / 120.0f);
    p = p * f + vsplat(1.0f / 24.0f);
    p = p * f + vsplat(1.0f / 6.0f);
    p = p * f + vsplat(0.5f);
    p = p * f + vsplat(1.0f);
    p = p * f + vsplat(1.0f);
    vi e = (__builtin_convertvector(r, vi) + 127) << 23;
    vf scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

/* rows [d0, d0+R) x tile t: acc = mu + sum over live k of At[d][k] * qf[k][tile] */
static inline __attribute__((always_inline)) void tile(
    int R, const float *qf, const uint8_t *live, const float *At, const float *mu, int64_t D,
    int64_t Np, int64_t nt, int64_t d0, int64_t t, int linear, float eps, float *out, int64_t N)
{
    vf acc[TC_ROWS][TC_NV];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < TC_NV; v++) acc[r][v] = vsplat(mu[d0 + r]);
    const int64_t c0 = t * TC_TN;
    for (int64_t k = 0; k < D; k++) {
        if (!live[k * nt + t]) continue;
        const float *row = qf + k * Np + c0;
        vf q[TC_NV];
        for (int v = 0; v < TC_NV; v++) q[v] = vload(row + v * TC_VL);
        for (int r = 0; r < R; r++) {
            vf a = vsplat(At[(d0 + r) * D + k]);
            for (int v = 0; v < TC_NV; v++) acc[r][v] += a * q[v];
        }
    }
    const vf zero = vsplat(0.0f), ve = vsplat(eps);
    int64_t w = N - c0 < TC_TN ? N - c0 : TC_TN;
    for (int r = 0; r < R; r++) {
        float buf[TC_TN];
        for (int v = 0; v < TC_NV; v++) {
            vf x = acc[r][v];
            if (linear) {
                x = vexp2(x) - ve;
                x = vmax(x, zero);
            }
            vstore(buf + v * TC_VL, x);
        }
        memcpy(out + (d0 + r) * N + c0, buf, (size_t)w * sizeof(float));
    }
}

/* Reconstruct n samples. u: n x D x N zigzag codes (uint8); out: n x D x N float32;
 * qf: scratch of D * Np floats, live: scratch of D * nt bytes (Np = nt * TC_TN >= N). */
void tc_reconstruct_u8(const uint8_t *u, int64_t n, int64_t D, int64_t N, const float *At,
                       const float *mu, float eps, int linear, float *qf, uint8_t *live,
                       float *out)
{
    const int64_t nt = (N + TC_TN - 1) / TC_TN, Np = nt * TC_TN;
    for (int64_t s = 0; s < n; s++) {
        const uint8_t *us = u + s * D * N;
        float *os = out + s * D * N;
        for (int64_t k = 0; k < D; k++) {
            const uint8_t *uk = us + k * N;
            float *qk = qf + k * Np;
            for (int64_t j = 0; j < N; j++) {
                int32_t c = uk[j];
                qk[j] = (float)((c >> 1) ^ -(c & 1));
            }
            for (int64_t j = N; j < Np; j++) qk[j] = 0.0f;
            for (int64_t t = 0; t < nt; t++) {
                const int64_t a = t * TC_TN, b = a + TC_TN < N ? a + TC_TN : N;
                uint8_t any = 0;
                for (int64_t j = a; j < b; j++) any |= uk[j];
                live[k * nt + t] = any != 0;
            }
        }
        int64_t d0 = 0;
        for (; d0 + TC_ROWS <= D; d0 += TC_ROWS)
            for (int64_t t = 0; t < nt; t++)
                tile(TC_ROWS, qf, live, At, mu, D, Np, nt, d0, t, linear, eps, os, N);
        const int rest = (int)(D - d0);
        for (int64_t t = 0; t < nt && rest; t++) {
            switch (rest) { /* constant R per case: each specialised */
            case 1: tile(1, qf, live, At, mu, D, Np, nt, d0, t, linear, eps, os, N); break;
            case 2: tile(2, qf, live, At, mu, D, Np, nt, d0, t, linear, eps, os, N); break;
#if TC_ROWS > 3
            case 3: tile(3, qf, live, At, mu, D, Np, nt, d0, t, linear, eps, os, N); break;
#endif
#if TC_ROWS > 4
            case 4: tile(4, qf, live, At, mu, D, Np, nt, d0, t, linear, eps, os, N); break;
#endif
#if TC_ROWS > 5
            case 5: tile(5, qf, live, At, mu, D, Np, nt, d0, t, linear, eps, os, N); break;
#endif
            default: break;
            }
        }
    }
}
