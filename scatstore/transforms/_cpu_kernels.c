/* Fused CPU kernels of the scattering transform (float32).
 *
 * Compiled on first use by scatstore/transforms/_native.py with the machine's C compiler
 * (-O3 -march=native) and called through ctypes, which releases the GIL for the duration of the
 * call, so the per-thread pipelines of _torch_backend.run_cpu run them side by side.
 *
 * Why these three: after the FFTs (done by torch / MKL), the transform is memory-bound
 * elementwise work that eager torch runs as several passes over full-resolution buffers
 * (product, one pass per aliased block, squares, sum, sqrt, dense low-pass GEMMs). Here each is
 * one pass that keeps the row it works on in L1:
 *
 *   sc_prod_periodize  Z[u, f] = sum over the aliased blocks (a, b) of U[u] * F[f]
 *                      (complex map times real filter, Fourier-domain subsampling by s: kymatio's
 *                      mean over blocks, the 1/s^2 is folded into F by the caller)
 *   sc_modulus         |Z| for complex maps, written at per-map offsets
 *   sc_lowpass         S = A U B^T where A and B are banded circulant low-pass-and-subsample
 *                      matrices stored as (start index, dense window of coefficients) per row:
 *                      the row pass is vectorised along the contiguous columns, the column pass
 *                      is a short dot product per output over a row extended by wrap-around.
 *
 * All layouts are row-major; complex values are interleaved (re, im) float pairs. Offsets and
 * lengths are counted in floats.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define RESTRICT __restrict__

/* U maps: U + u_off[u] is a complex (M, N) map, for u < n_u.
 * F: n_f real (M, N) filters, contiguous.
 * boxes: per filter, n_boxes rows (a, b, p0, p1, q0, q1): the part [p0, p1) x [q0, q1) of
 * aliased block (a, b) of the s x s grid of (M/s, N/s) blocks where the filter is not negligible
 * (empty boxes have p0 == p1).
 * Z: output, complex (n_u, n_f, M/s, N/s), contiguous: Z[u, f] = sum over the boxes of
 * U[u] * F[f] folded onto the coarse grid (kymatio's Fourier subsampling; the 1/s^2 of its
 * mean is folded into F by the caller). */
void sc_prod_periodize(const float *U, const int64_t *u_off, int64_t n_u,
                       const float *F, int64_t n_f, int64_t M, int64_t N, int64_t s,
                       const int32_t *boxes, int64_t n_boxes, float *RESTRICT Z)
{
    const int64_t m = M / s, k = N / s;
    /* map-major: one map (up to 460 kB at 240^2) stays in L2 while all filters pass over it */
    for (int64_t u = 0; u < n_u; ++u) {
        const float *Uu = U + u_off[u];
        for (int64_t f = 0; f < n_f; ++f) {
            const float *Ff = F + f * M * N;
            const int32_t *bx = boxes + f * n_boxes * 6;
            float *RESTRICT zf = Z + (u * n_f + f) * m * k * 2;
            int64_t first = 0;
            if (bx[2] == 0 && bx[3] == m && bx[4] == 0 && bx[5] == k) {
                /* a whole-block box: assign instead of clearing then adding */
                const int64_t r0 = bx[0] * m, c0 = bx[1] * k;
                for (int64_t p = 0; p < m; ++p) {
                    const float *RESTRICT ur = Uu + ((r0 + p) * N + c0) * 2;
                    const float *RESTRICT fr = Ff + (r0 + p) * N + c0;
                    float *RESTRICT z = zf + p * k * 2;
#pragma GCC ivdep
                    for (int64_t q = 0; q < k; ++q) {
                        z[2 * q] = ur[2 * q] * fr[q];
                        z[2 * q + 1] = ur[2 * q + 1] * fr[q];
                    }
                }
                first = 1;
            } else {
                for (int64_t q = 0; q < m * k * 2; ++q) zf[q] = 0.0f;
            }
            for (int64_t bi = first; bi < n_boxes; ++bi) {
                const int32_t *b = bx + bi * 6;
                const int64_t r0 = b[0] * m, c0 = b[1] * k, q0 = b[4], q1 = b[5];
                for (int64_t p = b[2]; p < b[3]; ++p) {
                    const float *RESTRICT ur = Uu + ((r0 + p) * N + c0) * 2;
                    const float *RESTRICT fr = Ff + (r0 + p) * N + c0;
                    float *RESTRICT z = zf + p * k * 2;
#pragma GCC ivdep
                    for (int64_t q = q0; q < q1; ++q) {
                        z[2 * q] += ur[2 * q] * fr[q];
                        z[2 * q + 1] += ur[2 * q + 1] * fr[q];
                    }
                }
            }
        }
    }
}

/* Z: n_maps contiguous complex maps of len values; out + out_off[i] <- scale * |Z[i]|. */
void sc_modulus(const float *RESTRICT Z, int64_t n_maps, int64_t len, float *out,
                const int64_t *out_off, float scale)
{
    for (int64_t i = 0; i < n_maps; ++i) {
        const float *RESTRICT z = Z + i * len * 2;
        float *RESTRICT o = out + out_off[i];
#pragma GCC ivdep
        for (int64_t q = 0; q < len; ++q)
            o[q] = scale * sqrtf(z[2 * q] * z[2 * q] + z[2 * q + 1] * z[2 * q + 1]);
    }
}

/* GCC/Clang vector extensions, one vector = one register of the target: VF floats (16 with
 * AVX-512, 8 with AVX/AVX2, 4 with SSE2 or NEON and on other targets, where the compiler lowers
 * them to what it has). SC_VF=n on the command line forces a width (benchmarks, tests).
 * aligned(4) makes loads and stores through these types unaligned-safe.
 * Register tiles: the row passes keep 4 (row_combine) or 8 (row_combine2) accumulators and 4
 * loaded vectors live, 12 registers: within the 16 of AVX2 and SSE, the 32 of AVX-512 and NEON
 * (the former 64-byte vectors on an AVX2 target took two registers each and spilled). */
#ifndef SC_VF
#if defined(__AVX512F__)
#define SC_VF 16
#elif defined(__AVX__)
#define SC_VF 8
#else
#define SC_VF 4
#endif
#endif
#define VF SC_VF          /* floats per vector */
#define CL (SC_VF / 2)    /* complex lanes per vector */
typedef float vf __attribute__((vector_size(VF * 4), aligned(4)));
typedef float vhf __attribute__((vector_size(VF * 2), aligned(4)));  /* half a vector */
typedef double vd __attribute__((vector_size(VF * 4), aligned(8)));

/* the vector width the library was built with (native_info reports it) */
int64_t sc_vector_floats(void) { return VF; }

/* t[0:k] = sum_w c[w] * U[(row0 + w) mod m, 0:k]. Accumulators stay in registers over w: full
 * blocks of 4 vectors use 4 independent chains; the rest (< 4 vectors) is done in one more pass
 * over w whose up to 3 + 1 + VF/2 chains are also independent, so no FMA waits on the latency
 * of the previous one. */
static void row_combine(float *RESTRICT t, const float *Um, int64_t m, int64_t k, int64_t row0,
                        const float *c, int64_t W)
{
    int64_t q = 0;
    for (; q + 4 * VF <= k; q += 4 * VF) {
        vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        int64_t row = row0;
        for (int64_t w = 0; w < W; ++w) {
            const float *u = Um + row * k + q;
            const float cw = c[w];
            a0 += cw * *(const vf *)(u);
            a1 += cw * *(const vf *)(u + VF);
            a2 += cw * *(const vf *)(u + 2 * VF);
            a3 += cw * *(const vf *)(u + 3 * VF);
            if (++row == m) row = 0;
        }
        *(vf *)(t + q) = a0;
        *(vf *)(t + q + VF) = a1;
        *(vf *)(t + q + 2 * VF) = a2;
        *(vf *)(t + q + 3 * VF) = a3;
    }
    if (q == k) return;
    const int64_t nb = (k - q) / VF, qh = q + VF * nb;
    const int hash = (k - qh) >= VF / 2;
    const int64_t qs = qh + (hash ? VF / 2 : 0), ns = k - qs;
    vf a0 = {0}, a1 = {0}, a2 = {0};
    vhf b0 = {0};
    float s[VF / 2] = {0};
    int64_t row = row0;
    for (int64_t w = 0; w < W; ++w) {
        const float *u = Um + row * k;
        const float cw = c[w];
        if (nb > 0) a0 += cw * *(const vf *)(u + q);
        if (nb > 1) a1 += cw * *(const vf *)(u + q + VF);
        if (nb > 2) a2 += cw * *(const vf *)(u + q + 2 * VF);
        if (hash) b0 += cw * *(const vhf *)(u + qh);
        for (int64_t j = 0; j < ns; ++j) s[j] += cw * u[qs + j];
        if (++row == m) row = 0;
    }
    if (nb > 0) *(vf *)(t + q) = a0;
    if (nb > 1) *(vf *)(t + q + VF) = a1;
    if (nb > 2) *(vf *)(t + q + 2 * VF) = a2;
    if (hash) *(vhf *)(t + qh) = b0;
    for (int64_t j = 0; j < ns; ++j) t[qs + j] = s[j];
}

/* Two output rows with the same window start (dense low-pass matrices): every vector of U is
 * loaded once for both rows, halving the loads of row_combine. */
static void row_combine2(float *RESTRICT t0, float *RESTRICT t1, const float *Um, int64_t m,
                         int64_t k, int64_t row0, const float *c0, const float *c1, int64_t W)
{
    int64_t q = 0;
    for (; q + 4 * VF <= k; q += 4 * VF) {
        vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        int64_t row = row0;
        for (int64_t w = 0; w < W; ++w) {
            const float *u = Um + row * k + q;
            const vf u0 = *(const vf *)(u), u1 = *(const vf *)(u + VF);
            const vf u2 = *(const vf *)(u + 2 * VF), u3 = *(const vf *)(u + 3 * VF);
            const float x = c0[w], y = c1[w];
            a0 += x * u0; a1 += x * u1; a2 += x * u2; a3 += x * u3;
            b0 += y * u0; b1 += y * u1; b2 += y * u2; b3 += y * u3;
            if (++row == m) row = 0;
        }
        *(vf *)(t0 + q) = a0; *(vf *)(t0 + q + VF) = a1;
        *(vf *)(t0 + q + 2 * VF) = a2; *(vf *)(t0 + q + 3 * VF) = a3;
        *(vf *)(t1 + q) = b0; *(vf *)(t1 + q + VF) = b1;
        *(vf *)(t1 + q + 2 * VF) = b2; *(vf *)(t1 + q + 3 * VF) = b3;
    }
    if (q == k) return;
    const int64_t nb = (k - q) / VF, qh = q + VF * nb;
    const int hash = (k - qh) >= VF / 2;
    const int64_t qs = qh + (hash ? VF / 2 : 0), ns = k - qs;
    vf a0 = {0}, a1 = {0}, a2 = {0}, b0 = {0}, b1 = {0}, b2 = {0};
    vhf ah = {0}, bh = {0};
    float sa[VF / 2] = {0}, sb[VF / 2] = {0};
    int64_t row = row0;
    for (int64_t w = 0; w < W; ++w) {
        const float *u = Um + row * k;
        const float x = c0[w], y = c1[w];
        if (nb > 0) { const vf v = *(const vf *)(u + q); a0 += x * v; b0 += y * v; }
        if (nb > 1) { const vf v = *(const vf *)(u + q + VF); a1 += x * v; b1 += y * v; }
        if (nb > 2) { const vf v = *(const vf *)(u + q + 2 * VF); a2 += x * v; b2 += y * v; }
        if (hash) { const vhf v = *(const vhf *)(u + qh); ah += x * v; bh += y * v; }
        for (int64_t j = 0; j < ns; ++j) { sa[j] += x * u[qs + j]; sb[j] += y * u[qs + j]; }
        if (++row == m) row = 0;
    }
    if (nb > 0) { *(vf *)(t0 + q) = a0; *(vf *)(t1 + q) = b0; }
    if (nb > 1) { *(vf *)(t0 + q + VF) = a1; *(vf *)(t1 + q + VF) = b1; }
    if (nb > 2) { *(vf *)(t0 + q + 2 * VF) = a2; *(vf *)(t1 + q + 2 * VF) = b2; }
    if (hash) { *(vhf *)(t0 + qh) = ah; *(vhf *)(t1 + qh) = bh; }
    for (int64_t j = 0; j < ns; ++j) { t0[qs + j] = sa[j]; t1[qs + j] = sb[j]; }
}

/* out rows i < R: out[i] = sum_w c[i, w] * U[(start[i] + w) mod m], rows paired where they
 * share a window start. */
static void rows_combine(float *out, int64_t ostride, const float *Um, int64_t m, int64_t k,
                         const int32_t *start, const float *c, int64_t R, int64_t W)
{
    int64_t i = 0;
    while (i < R) {
        if (i + 1 < R && start[i] == start[i + 1]) {
            row_combine2(out + i * ostride, out + (i + 1) * ostride, Um, m, k, start[i],
                         c + i * W, c + (i + 1) * W, W);
            i += 2;
        } else {
            row_combine(out + i * ostride, Um, m, k, start[i], c + i * W, W);
            i += 1;
        }
    }
}

/* U: n_maps contiguous real (m, k) maps. Output map i (Mo, No) at out + out_off[i]:
 *   T[r, :]  = sum_w ca[r, w] * U[(r0[r] + w) mod m, :]          (r < Mo, w < Wa)
 *   S[r, c]  = sum_w cb[c, w] * T[r, (c0[c] + w) mod k]          (c < No, w < Wb)
 * The column pass runs as a second row pass on T transposed (rows of Mo padded to a multiple of
 * 16), so both passes are register-blocked vector FMAs with no horizontal sums.
 * scratch: Mo * k + (k + No) * round_up(Mo, 16) floats. */
void sc_lowpass(const float *U, int64_t n_maps, int64_t m, int64_t k,
                const int32_t *r0, const float *ca, int64_t Mo, int64_t Wa,
                const int32_t *c0, const float *cb, int64_t No, int64_t Wb,
                float *RESTRICT scratch, float *out, const int64_t *out_off)
{
    const int64_t mp = (Mo + 15) / 16 * 16;
    float *RESTRICT T = scratch;              /* (Mo, k) */
    float *RESTRICT TT = T + Mo * k;          /* (k, mp): T transposed */
    float *RESTRICT ST = TT + k * mp;         /* (No, mp): S transposed */
    for (int64_t i = 0; i < n_maps; ++i) {
        const float *Um = U + i * m * k;
        rows_combine(T, k, Um, m, k, r0, ca, Mo, Wa);
        for (int64_t q = 0; q < k; ++q) {
            float *tt = TT + q * mp;
            for (int64_t r = 0; r < Mo; ++r) tt[r] = T[r * k + q];
            for (int64_t r = Mo; r < mp; ++r) tt[r] = 0.0f;
        }
        rows_combine(ST, mp, TT, k, mp, c0, cb, No, Wb);
        float *RESTRICT o = out + out_off[i];
        for (int64_t r = 0; r < Mo; ++r)
            for (int64_t c = 0; c < No; ++c) o[r * No + c] = ST[c * mp + r];
    }
}


/* ---- FFT ------------------------------------------------------------------------------------
 * A mixed-radix (2, 3, 4, 5) Stockham FFT vectorised across CL independent transforms (the
 * complex lanes of one vector: 8 with AVX-512, 4 with AVX2, 2 with SSE/NEON), for the
 * 2^a 3^b 5^c sizes of kymatio's padded grids (240, 120, 60 at 224^2). On the machines measured
 * it is about twice as fast as torch's MKL FFT on AMD CPUs, deterministic, and it works in place
 * in the kernels' buffers. Other sizes use torch's FFT. */
#if SC_VF == 16
#define SWAP_MASK 1,0,3,2,5,4,7,6,9,8,11,10,13,12,15,14
#define PM_INIT {1,-1,1,-1,1,-1,1,-1,1,-1,1,-1,1,-1,1,-1}
#elif SC_VF == 8
#define SWAP_MASK 1,0,3,2,5,4,7,6
#define PM_INIT {1,-1,1,-1,1,-1,1,-1}
#elif SC_VF == 4
#define SWAP_MASK 1,0,3,2
#define PM_INIT {1,-1,1,-1}
#else
#error "SC_VF must be 4, 8 or 16"
#endif
typedef int32_t vi __attribute__((vector_size(VF * 4)));
typedef int64_t vl __attribute__((vector_size(VF * 4)));
#if defined(__clang__)
#define SWAP_RI(z) __builtin_shufflevector(z, z, SWAP_MASK)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SWAP_RI(z) __builtin_shuffle(z, (vi){SWAP_MASK})
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (vl){__VA_ARGS__})
#endif

/* CL x CL transpose of 64-bit elements (complex float pairs): o[j][i] = a[i][j] */
static inline void transpose_cl(const vd *a, vd *o)
{
#if SC_VF == 16
    vd b[8], c[8];
    for (int i = 0; i < 8; i += 2) {
        b[i] = SHUF(a[i], a[i + 1], 0, 8, 2, 10, 4, 12, 6, 14);
        b[i + 1] = SHUF(a[i], a[i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    }
    for (int i = 0; i < 8; i += 4) {
        for (int j = 0; j < 2; ++j) {
            c[i + j] = SHUF(b[i + j], b[i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            c[i + j + 2] = SHUF(b[i + j], b[i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    }
    for (int j = 0; j < 4; ++j) {
        o[j] = SHUF(c[j], c[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        o[j + 4] = SHUF(c[j], c[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
#elif SC_VF == 8
    const vd b0 = SHUF(a[0], a[1], 0, 4, 2, 6), b1 = SHUF(a[0], a[1], 1, 5, 3, 7);
    const vd b2 = SHUF(a[2], a[3], 0, 4, 2, 6), b3 = SHUF(a[2], a[3], 1, 5, 3, 7);
    o[0] = SHUF(b0, b2, 0, 1, 4, 5); o[2] = SHUF(b0, b2, 2, 3, 6, 7);
    o[1] = SHUF(b1, b3, 0, 1, 4, 5); o[3] = SHUF(b1, b3, 2, 3, 6, 7);
#else
    o[0] = SHUF(a[0], a[1], 0, 2); o[1] = SHUF(a[0], a[1], 1, 3);
#endif
}

static const vf PM = PM_INIT;  /* (a,b)*(-i) = (b,-a) = swap*PM */

static inline vf bcast2(const float *p) { /* (p0, p1) repeated */
    double d; memcpy(&d, p, 8); vd v = d + (vd){0}; return (vf)v;
}
/* multiply by -i (dir=+1: forward) or +i (dir=-1) : swap then sign pattern */
static inline vf rot(vf z, float dir) { return SWAP_RI(z) * (PM * dir); }

/* radix butterflies, forward sign e^{-2 pi i/R}; dir = 1 forward, -1 inverse */
static inline void bf2(vf *v) { vf a = v[0] + v[1]; v[1] = v[0] - v[1]; v[0] = a; }
static inline void bf4(vf *v, float dir) {
    vf s02 = v[0] + v[2], d02 = v[0] - v[2], s13 = v[1] + v[3], d13 = rot(v[1] - v[3], dir);
    v[0] = s02 + s13; v[2] = s02 - s13; v[1] = d02 + d13; v[3] = d02 - d13;
}
static inline void bf3(vf *v, float dir) {
    const float S = 0.86602540378443864676f;
    vf t1 = v[1] + v[2], t2 = v[0] - 0.5f * t1, t3 = rot(S * (v[1] - v[2]), dir);
    v[0] = v[0] + t1; v[1] = t2 + t3; v[2] = t2 - t3;
}
static inline void bf5(vf *v, float dir) {
    const float c1 = 0.30901699437494742410f, c2 = -0.80901699437494742410f;
    const float s1 = 0.95105651629515357212f, s2 = 0.58778525229247312917f;
    vf t1 = v[1] + v[4], t2 = v[2] + v[3], t3 = v[1] - v[4], t4 = v[2] - v[3];
    vf a1 = v[0] + c1 * t1 + c2 * t2, a2 = v[0] + c2 * t1 + c1 * t2;
    vf b1 = rot(s1 * t3 + s2 * t4, dir), b2 = rot(s2 * t3 - s1 * t4, dir);
    v[0] = v[0] + t1 + t2; v[1] = a1 + b1; v[4] = a1 - b1; v[2] = a2 + b2; v[3] = a2 - b2;
}

/* One Stockham pass of radix R (a compile-time constant after inlining, so the R values stay
 * in registers): y[(j/Ns)*Ns*R + j%Ns + r*Ns] = DFT_R(x[j + r*n/R] * w^(r*(j%Ns))). */
static inline __attribute__((always_inline)) void
pass_r(const vf *RESTRICT x, vf *RESTRICT y, int64_t n, int64_t Ns, const float *tw,
       float dir, const int R)
{
    const int64_t nR = n / R;
    for (int64_t jb = 0; jb < nR; jb += Ns) {
        vf *RESTRICT yb = y + jb * R;
        for (int64_t jm = 0; jm < Ns; ++jm) {
            const int64_t j = jb + jm;
            vf v[5];
            for (int r = 0; r < R; ++r) v[r] = x[j + r * nR];
            if (jm) {
                const float *t = tw + jm * (R - 1) * 4;
                for (int r = 1; r < R; ++r) {
                    const vf wr = bcast2(t + (r - 1) * 4), wi = bcast2(t + (r - 1) * 4 + 2);
                    v[r] = v[r] * wr + SWAP_RI(v[r]) * wi;
                }
            }
            if (R == 2) bf2(v);
            else if (R == 3) bf3(v, dir);
            else if (R == 4) bf4(v, dir);
            else bf5(v, dir);
            for (int r = 0; r < R; ++r) yb[jm + r * Ns] = v[r];
        }
    }
}

static void pass2(const vf *x, vf *y, int64_t n, int64_t Ns, const float *tw, float dir)
{ pass_r(x, y, n, Ns, tw, dir, 2); }
static void pass3(const vf *x, vf *y, int64_t n, int64_t Ns, const float *tw, float dir)
{ pass_r(x, y, n, Ns, tw, dir, 3); }
static void pass4(const vf *x, vf *y, int64_t n, int64_t Ns, const float *tw, float dir)
{ pass_r(x, y, n, Ns, tw, dir, 4); }
static void pass5(const vf *x, vf *y, int64_t n, int64_t Ns, const float *tw, float dir)
{ pass_r(x, y, n, Ns, tw, dir, 5); }

/* Stockham autosort FFT of length n on vectors (8 independent complex lanes each), radices
 * radix[0..npass). tw: per pass with Ns > 1, Ns*(R-1) twiddles of 4 floats (c, c, -s, s),
 * angle dir*(-2 pi) jm r / (Ns R). Returns the buffer holding the result (x or y). */
static vf *fft_vec(vf *RESTRICT x, vf *RESTRICT y, int64_t n, const int32_t *radix,
                     int64_t npass, const float *tw, float dir)
{
    int64_t Ns = 1;
    for (int64_t ps = 0; ps < npass; ++ps) {
        const int64_t R = radix[ps];
        switch (R) {
        case 2: pass2(x, y, n, Ns, tw, dir); break;
        case 3: pass3(x, y, n, Ns, tw, dir); break;
        case 4: pass4(x, y, n, Ns, tw, dir); break;
        default: pass5(x, y, n, Ns, tw, dir); break;
        }
        if (Ns > 1) tw += Ns * (R - 1) * 4;
        Ns *= R;
        vf *tmp = x; x = y; y = tmp;
    }
    return x;
}

/* In-place, unnormalised 2D FFT (inverse: exponent sign +) of n_maps contiguous complex (m, k)
 * maps. rad_m, tw_m, rad_k, tw_k: radices and twiddles of the m- and k-point transforms (built by
 * _torch_backend.fft_plan). Column pass: strips of 8 columns loaded as rows of vectors (8
 * complex lanes = 8 independent transforms); row pass: 8 rows at a time, turned into the same
 * lane layout by 8 x 8 tile transposes. work: 2 * max(m, k) vectors of 64 bytes. */
void sc_fft2(float *data, int64_t n_maps, int64_t m, int64_t k,
             const int32_t *rad_m, int64_t np_m, const float *tw_m,
             const int32_t *rad_k, int64_t np_k, const float *tw_k, int64_t inverse,
             float *work)
{
    const float dir = inverse ? -1.0f : 1.0f;
    const int64_t nmax = m > k ? m : k;
    vf *x = (vf *)work, *y = x + nmax;
    for (int64_t i = 0; i < n_maps; ++i) {
        float *d = data + i * m * k * 2;
        for (int64_t c = 0; c < k; c += CL) {
            const int64_t w = (k - c) < CL ? (k - c) : CL;
            if (w == CL) {
                for (int64_t r = 0; r < m; ++r) x[r] = *(const vf *)(d + (r * k + c) * 2);
            } else {
                for (int64_t r = 0; r < m; ++r) {
                    vf t = {0};
                    memcpy(&t, d + (r * k + c) * 2, w * 8);
                    x[r] = t;
                }
            }
            vf *res = fft_vec(x, y, m, rad_m, np_m, tw_m, dir);
            if (w == CL) {
                for (int64_t r = 0; r < m; ++r) *(vf *)(d + (r * k + c) * 2) = res[r];
            } else {
                for (int64_t r = 0; r < m; ++r) memcpy(d + (r * k + c) * 2, &res[r], w * 8);
            }
        }
        for (int64_t r0 = 0; r0 < m; r0 += CL) {
            const int64_t h = (m - r0) < CL ? (m - r0) : CL;
            double *rows = (double *)(d + r0 * k * 2);
            const int64_t kq = h == CL ? k / CL * CL : 0;  /* columns done by CL x CL tiles */
            for (int64_t q = 0; q < kq; q += CL) {
                vd a[CL];
                for (int l = 0; l < CL; ++l) a[l] = *(const vd *)(rows + l * k + q);
                transpose_cl(a, (vd *)(x + q));
            }
            for (int64_t q = kq; q < k; ++q) {
                vd t = {0};
                for (int64_t l = 0; l < h; ++l) t[l] = rows[l * k + q];
                x[q] = (vf)t;
            }
            vf *res = fft_vec(x, y, k, rad_k, np_k, tw_k, dir);
            for (int64_t q = 0; q < kq; q += CL) {
                vd a[CL];
                transpose_cl((const vd *)(res + q), a);
                for (int l = 0; l < CL; ++l) *(vd *)(rows + l * k + q) = a[l];
            }
            for (int64_t q = kq; q < k; ++q) {
                vd t = (vd)res[q];
                for (int64_t l = 0; l < h; ++l) rows[l * k + q] = t[l];
            }
        }
    }
}
