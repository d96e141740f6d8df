/* Reconstruction kernel of the coefficient codec (scatstore/transforms/coefcodec.py).
 *
 * One sample: zigzag codes u (D components x N positions, component-major, uint8 or uint16; the
 * all-zero components left out, as format version 2 stores them) ->
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

/* TC_ROWS x TC_NV accumulators + TC_NV loads + 1 broadcast fit the register file:
 * 6 x 4 + 5 = 29 of 32 zmm / NEON q registers, 3 x 3 + 4 = 13 of 16 ymm */
#if defined(__AVX512F__)
#define TC_VB 64
#define TC_ROWS_ 6
#define TC_NV_ 4
#define TC_KERNEL "avx512f"
#elif defined(__AVX2__)
#define TC_VB 32
#define TC_ROWS_ 3
#define TC_NV_ 3
#define TC_KERNEL "avx2"
#elif defined(__aarch64__)
#define TC_VB 16
#define TC_ROWS_ 6
#define TC_NV_ 4
#define TC_KERNEL "neon"
#else
#define TC_VB 16
#define TC_ROWS_ 2
#define TC_NV_ 2
#define TC_KERNEL "generic-vec4"
#endif

#ifndef TC_ROWS /* -DTC_ROWS=R -DTC_NV=V: other tiles, for tuning (R <= 6) */
#define TC_ROWS TC_ROWS_
#endif
#ifndef TC_NV
#define TC_NV TC_NV_
#endif
_Static_assert(TC_ROWS >= 1 && TC_ROWS <= 6, "the remainder rows below cover TC_ROWS <= 6");
#define TC_VL (TC_VB / 4)     /* floats per vector */
#define TC_TN (TC_VL * TC_NV) /* columns per tile */

typedef float vf __attribute__((vector_size(TC_VB)));
typedef float vfu __attribute__((vector_size(TC_VB), aligned(4))); /* unaligned loads */
typedef int32_t vi __attribute__((vector_size(TC_VB)));

const char *tc_kernel(void) { return TC_KERNEL; }
int64_t tc_tile_columns(void) { return TC_TN; }

static inline vf vsplat(float a)
{
    vf v = {a};
    const vi lane0 = {0};
    return __builtin_shuffle(v, lane0); /* lane 0 everywhere: one vbroadcastss */
}

static inline vf vload(const float *p) { return *(const vfu *)p; }

static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* lane-wise max / min of vector type VT with masks of the same-width integer vector MT (C has
 * no vector ?:; the casts reinterpret the bits) */
#define TC_SELECT(name, VT, MT, op)                                                           \
    static inline VT name(VT a, VT b)                                                         \
    {                                                                                         \
        MT m = a op b;                                                                        \
        return (VT)((m & (MT)a) | (~m & (MT)b));                                              \
    }
TC_SELECT(vmax, vf, vi, >)
TC_SELECT(vmin, vf, vi, <)

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

/* rows [d0, d0+R) x one tile of columns starting at c0: acc = mu + sum over the tile's live
 * components ks[0..nk) of At[d][k] * qf[k][tile]. The list is built once per tile, so the
 * product loop has no data-dependent branch (a per-component test mispredicts on about half
 * of them: it cost more than the product). */
static inline __attribute__((always_inline)) void tile(
    int R, const float *qf, const int32_t *ks, int64_t nk, const float *At, const float *mu,
    int64_t D, int64_t Np, int64_t d0, int64_t c0, int linear, float eps, float *out, int64_t N)
{
    vf acc[TC_ROWS][TC_NV];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < TC_NV; v++) acc[r][v] = vsplat(mu[d0 + r]);
    for (int64_t i = 0; i < nk; i++) {
        const int64_t k = ks[i];
        const float *row = qf + k * Np + c0;
        vf q[TC_NV];
        _Pragma("GCC unroll 8")
        for (int v = 0; v < TC_NV; v++) q[v] = vload(row + v * TC_VL);
        _Pragma("GCC unroll 8")
        for (int r = 0; r < R; r++) {
            vf a = vsplat(At[(d0 + r) * D + k]);
            _Pragma("GCC unroll 8")
            for (int v = 0; v < TC_NV; v++) acc[r][v] += a * q[v];
        }
    }
    const vf zero = vsplat(0.0f), ve = vsplat(eps);
    const int64_t w = N - c0 < TC_TN ? N - c0 : TC_TN;
    for (int r = 0; r < R; r++) {
        float *o = out + (d0 + r) * N + c0;
        if (w == TC_TN) { /* a whole tile: straight to the output row */
            _Pragma("GCC unroll 8")
            for (int v = 0; v < TC_NV; v++) {
                vf x = acc[r][v];
                if (linear) x = vmax(vexp2(x) - ve, zero);
                vstore(o + v * TC_VL, x);
            }
        } else { /* the last partial tile of a row */
            float buf[TC_TN];
            for (int v = 0; v < TC_NV; v++) {
                vf x = acc[r][v];
                if (linear) x = vmax(vexp2(x) - ve, zero);
                vstore(buf + v * TC_VL, x);
            }
            memcpy(o, buf, (size_t)w * sizeof(float));
        }
    }
}

/* Reconstruct n samples. Sample s holds the zigzag codes (width[s] bytes each: uint8, or
 * uint16 in the host's byte order, little endian on every target) of nlive[s] components,
 * comps[s*D .. s*D+nlive[s]) (increasing; the others are all zero), one row of N each, at
 * u + s*stride (even); out: n x D x N float32; qf: scratch of D * Np floats, ks: scratch of nt * D int32
 * (Np = nt * TC_TN >= N, nt tiles). Per sample: the signed codes of each component's live
 * tiles (any code non-zero) as floats, and per tile the list of its live components; then,
 * tile by tile (its live rows of qf stay in L1 across the row groups), every output row
 * group of the tile. */
/* one tile of a component's zigzag codes (element type T) -> signed float codes; 0 if all zero */
#define TC_CONVERT(T, uk, qk, a, b, live)                                                     \
    do {                                                                                      \
        const T *u_ = (const T *)(uk);                                                        \
        T any_ = 0;                                                                           \
        for (int64_t j = a; j < b; j++) any_ |= u_[j];                                        \
        live = any_ != 0;                                                                     \
        if (live)                                                                             \
            for (int64_t j = a; j < b; j++) {                                                 \
                int32_t c = u_[j];                                                            \
                (qk)[j] = (float)((c >> 1) ^ -(c & 1));                                       \
            }                                                                                 \
    } while (0)

void tc_reconstruct(const uint8_t *u, int64_t stride, const int32_t *width, int64_t n, int64_t D,
                    int64_t N, const int32_t *nlive, const int32_t *comps, const float *At,
                    const float *mu, float eps, int linear, float *qf, int32_t *ks, float *out)
{
    const int64_t nt = (N + TC_TN - 1) / TC_TN, Np = nt * TC_TN;
    for (int64_t s = 0; s < n; s++) {
        const uint8_t *us = u + s * stride;
        const int64_t wb = width[s]; /* bytes per code: 1, or 2 (uint16, little-endian host) */
        float *os = out + s * D * N;
        int32_t cnt[nt];
        for (int64_t t = 0; t < nt; t++) cnt[t] = 0;
        const int32_t *cs = comps + s * D;
        for (int64_t i = 0; i < nlive[s]; i++) {
            const int64_t k = cs[i];
            const uint8_t *uk = us + i * N * wb;
            float *qk = qf + k * Np;
            for (int64_t t = 0; t < nt; t++) {
                const int64_t a = t * TC_TN, b = a + TC_TN < N ? a + TC_TN : N;
                int live;
                if (wb == 1)
                    TC_CONVERT(uint8_t, uk, qk, a, b, live);
                else
                    TC_CONVERT(uint16_t, uk, qk, a, b, live);
                if (!live) continue;
                ks[t * D + cnt[t]++] = (int32_t)k;
                for (int64_t j = b; j < a + TC_TN; j++) qk[j] = 0.0f;
            }
        }
        for (int64_t t = 0; t < nt; t++) {
            const int32_t *kt = ks + t * D;
            const int64_t c0 = t * TC_TN;
            int64_t d0 = 0;
            for (; d0 + TC_ROWS <= D; d0 += TC_ROWS)
                tile(TC_ROWS, qf, kt, cnt[t], At, mu, D, Np, d0, c0, linear, eps, os, N);
            switch ((int)(D - d0)) { /* constant R per case: each specialised */
#define TC_REST(R) case R: tile(R, qf, kt, cnt[t], At, mu, D, Np, d0, c0, linear, eps, os, N); break
            TC_REST(1);
            TC_REST(2);
#if TC_ROWS > 3
            TC_REST(3);
#endif
#if TC_ROWS > 4
            TC_REST(4);
#endif
#if TC_ROWS > 5
            TC_REST(5);
#endif
#undef TC_REST
            default: break;
            }
        }
    }
}

/* ------------------------------------------------------------------ the encoder (exact)
 *
 * tc_quantize: n samples of float32 coefficients x (n x D x N) -> zigzag codes (uint16, n x D x N)
 * and each sample's largest code, by exactly the integer recipe of coefcodec.py (numpy gives
 * the same codes, tested):
 *
 *   v = max(x, 0) + eps (float32), b = bits of v,
 *   Y = ((b >> 23) - 127) * 2**12 + T[(b >> 10) & 8191] - M[k]             (int32, exact)
 *   Z = sum_k A[d][k] * Y[k]       integer-valued doubles below 2**46: exact in any order
 *   q = clamp(floor((2Z + s) / (2s)), -32767, 32767)   one correctly rounded division
 *   u = (q << 1) ^ (q >> 31)
 */
#define TQ_ROWS TC_ROWS_ /* the encoder's tile: its own constants */
#define TQ_NV TC_NV_
#define TD_VL (TC_VB / 8)
#define TD_TN (TD_VL * TQ_NV)
typedef double vd __attribute__((vector_size(TC_VB)));
typedef double vdu __attribute__((vector_size(TC_VB), aligned(8)));
typedef int64_t vl __attribute__((vector_size(TC_VB)));
typedef int32_t vh __attribute__((vector_size(TC_VB / 2))); /* one int32 per double lane */

static inline vd vdsplat(double a)
{
    vd v = {a};
    const vl lane0 = {0};
    return __builtin_shuffle(v, lane0);
}

static inline vh vhsplat(int32_t a)
{
    const vh zero = {0};
    return zero + a;
}

TC_SELECT(vhmax, vh, vh, >)

TC_SELECT(vdmax, vd, vl, >)
TC_SELECT(vdmin, vd, vl, <)



static inline __attribute__((always_inline)) void qtile(
    int R, const double *Yd, const double *A, const double *s, int64_t D, int64_t Np,
    int64_t d0, int64_t c0, int64_t N, uint16_t *u, int32_t *umax)
{
    vd acc[TQ_ROWS][TQ_NV];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < TQ_NV; v++) acc[r][v] = vdsplat(0.0);
    for (int64_t k = 0; k < D; k++) {
        const double *row = Yd + k * Np + c0;
        vd y[TQ_NV];
        _Pragma("GCC unroll 8")
        for (int v = 0; v < TQ_NV; v++) y[v] = *(const vdu *)(row + v * TD_VL);
        _Pragma("GCC unroll 8")
        for (int r = 0; r < R; r++) {
            vd a = vdsplat(A[(d0 + r) * D + k]);
            _Pragma("GCC unroll 8")
            for (int v = 0; v < TQ_NV; v++) acc[r][v] += a * y[v];
        }
    }
    int64_t w = N - c0 < TD_TN ? N - c0 : TD_TN;
    /* floor(t) for |t| < 2**51, exactly: r = t rounded to nearest by the 1.5 * 2**52 trick
     * (exact in round-to-nearest), minus 1 where r > t. Then the clamp and the zigzag, all in
     * vectors; only the uint16 stores of the last partial tile are a scalar loop. */
    const vd magic = vdsplat(6755399441055744.0), one = vdsplat(1.0), two = vdsplat(2.0);
    const vd qlo = vdsplat(-32767.0), qhi = vdsplat(32767.0);
    for (int r = 0; r < R; r++) {
        const vd sd = vdsplat(s[d0 + r]), s2 = vdsplat(s[d0 + r] * 2.0);
        uint16_t *ur = u + (d0 + r) * N + c0;
        vh mx = vhsplat(0);
        int32_t zz[TD_TN];
        for (int v = 0; v < TQ_NV; v++) {
            vd t = (acc[r][v] * two + sd) / s2;
            vd rn = (t + magic) - magic;
            vl gt = rn > t;                          /* -1 where rounding went up */
            vd f = rn - (vd)((vl)one & gt);          /* floor(t) */
            f = vdmin(vdmax(f, qlo), qhi);
            vh q = __builtin_convertvector(f, vh);   /* exact: |f| <= 32767 */
            vh z = (q << 1) ^ (q >> 31);
            mx = vhmax(mx, z);
            memcpy(zz + v * TD_VL, &z, sizeof z);
        }
        for (int j = 0; j < w; j++) ur[j] = (uint16_t)zz[j];
        int32_t m = *umax;
        for (int j = 0; j < TD_VL; j++) m = mx[j] > m ? (int32_t)mx[j] : m;
        *umax = m;
    }
}

int64_t tc_quantize_tile_columns(void) { return TD_TN; }

/* Yd: scratch of D * Np doubles, Np = ceil(N / TD_TN) * TD_TN */
void tc_quantize(const float *x, int64_t n, int64_t D, int64_t N, float eps,
                 const int32_t *table, const int32_t *M, const double *A, const double *s,
                 double *Yd, uint16_t *u, int32_t *umax)
{
    const int64_t nt = (N + TD_TN - 1) / TD_TN, Np = nt * TD_TN;
    for (int64_t i = 0; i < n; i++) {
        const float *xs = x + i * D * N;
        for (int64_t k = 0; k < D; k++) {
            const float *xk = xs + k * N;
            double *yk = Yd + k * Np;
            const int32_t mk = M[k];
            for (int64_t j = 0; j < N; j++) {
                float v = xk[j] > 0.0f ? xk[j] : 0.0f;
                v += eps;
                int32_t b;
                memcpy(&b, &v, sizeof b);
                int32_t Y = (((b >> 23) - 127) << 12) + table[(b >> 10) & 8191];
                yk[j] = (double)(Y - mk);
            }
            for (int64_t j = N; j < Np; j++) yk[j] = 0.0;
        }
        uint16_t *us = u + i * D * N;
        int32_t m = 0;
        int64_t d0 = 0;
        for (; d0 + TQ_ROWS <= D; d0 += TQ_ROWS)
            for (int64_t t = 0; t < nt; t++)
                qtile(TQ_ROWS, Yd, A, s, D, Np, d0, t * TD_TN, N, us, &m);
        const int rest = (int)(D - d0);
        for (int64_t t = 0; t < nt && rest; t++) {
            switch (rest) {
            case 1: qtile(1, Yd, A, s, D, Np, d0, t * TD_TN, N, us, &m); break;
            case 2: qtile(2, Yd, A, s, D, Np, d0, t * TD_TN, N, us, &m); break;
#if TQ_ROWS > 3
            case 3: qtile(3, Yd, A, s, D, Np, d0, t * TD_TN, N, us, &m); break;
#endif
#if TQ_ROWS > 4
            case 4: qtile(4, Yd, A, s, D, Np, d0, t * TD_TN, N, us, &m); break;
#endif
#if TQ_ROWS > 5
            case 5: qtile(5, Yd, A, s, D, Np, d0, t * TD_TN, N, us, &m); break;
#endif
            default: break;
            }
        }
        umax[i] = m;
    }
}
