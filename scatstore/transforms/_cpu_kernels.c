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

/* Z: n_maps contiguous complex maps of len values; out + out_off[i] <- |Z[i]| (len floats). */
void sc_modulus(const float *RESTRICT Z, int64_t n_maps, int64_t len, float *out,
                const int64_t *out_off)
{
    for (int64_t i = 0; i < n_maps; ++i) {
        const float *RESTRICT z = Z + i * len * 2;
        float *RESTRICT o = out + out_off[i];
#pragma GCC ivdep
        for (int64_t q = 0; q < len; ++q)
            o[q] = sqrtf(z[2 * q] * z[2 * q] + z[2 * q + 1] * z[2 * q + 1]);
    }
}

/* GCC/Clang vector extensions: portable SIMD (lowered to AVX-512, AVX2, NEON... whatever the
 * target has); aligned(4) makes loads and stores through these types unaligned-safe. */
typedef float v16f __attribute__((vector_size(64), aligned(4)));
typedef float v8f __attribute__((vector_size(32), aligned(4)));

/* t[0:k] = sum_w c[w] * U[(row0 + w) mod m, 0:k]. Accumulators stay in registers over w: full
 * blocks of 64 columns use 4 independent vector chains; the rest (< 64 columns) is done in one
 * more pass over w whose up to 3 + 1 + 7 chains are also independent, so no FMA waits on the
 * latency of the previous one. */
static void row_combine(float *RESTRICT t, const float *Um, int64_t m, int64_t k, int64_t row0,
                        const float *c, int64_t W)
{
    int64_t q = 0;
    for (; q + 64 <= k; q += 64) {
        v16f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        int64_t row = row0;
        for (int64_t w = 0; w < W; ++w) {
            const float *u = Um + row * k + q;
            const float cw = c[w];
            a0 += cw * *(const v16f *)(u);
            a1 += cw * *(const v16f *)(u + 16);
            a2 += cw * *(const v16f *)(u + 32);
            a3 += cw * *(const v16f *)(u + 48);
            if (++row == m) row = 0;
        }
        *(v16f *)(t + q) = a0;
        *(v16f *)(t + q + 16) = a1;
        *(v16f *)(t + q + 32) = a2;
        *(v16f *)(t + q + 48) = a3;
    }
    if (q == k) return;
    const int64_t nb = (k - q) / 16, q8 = q + 16 * nb;
    const int has8 = (k - q8) >= 8;
    const int64_t qs = q8 + (has8 ? 8 : 0), ns = k - qs;
    v16f a0 = {0}, a1 = {0}, a2 = {0};
    v8f b0 = {0};
    float s[8] = {0};
    int64_t row = row0;
    for (int64_t w = 0; w < W; ++w) {
        const float *u = Um + row * k;
        const float cw = c[w];
        if (nb > 0) a0 += cw * *(const v16f *)(u + q);
        if (nb > 1) a1 += cw * *(const v16f *)(u + q + 16);
        if (nb > 2) a2 += cw * *(const v16f *)(u + q + 32);
        if (has8) b0 += cw * *(const v8f *)(u + q8);
        for (int64_t j = 0; j < ns; ++j) s[j] += cw * u[qs + j];
        if (++row == m) row = 0;
    }
    if (nb > 0) *(v16f *)(t + q) = a0;
    if (nb > 1) *(v16f *)(t + q + 16) = a1;
    if (nb > 2) *(v16f *)(t + q + 32) = a2;
    if (has8) *(v8f *)(t + q8) = b0;
    for (int64_t j = 0; j < ns; ++j) t[qs + j] = s[j];
}

/* Two output rows with the same window start (dense low-pass matrices): every vector of U is
 * loaded once for both rows, halving the loads of row_combine. */
static void row_combine2(float *RESTRICT t0, float *RESTRICT t1, const float *Um, int64_t m,
                         int64_t k, int64_t row0, const float *c0, const float *c1, int64_t W)
{
    int64_t q = 0;
    for (; q + 64 <= k; q += 64) {
        v16f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        int64_t row = row0;
        for (int64_t w = 0; w < W; ++w) {
            const float *u = Um + row * k + q;
            const v16f u0 = *(const v16f *)(u), u1 = *(const v16f *)(u + 16);
            const v16f u2 = *(const v16f *)(u + 32), u3 = *(const v16f *)(u + 48);
            const float x = c0[w], y = c1[w];
            a0 += x * u0; a1 += x * u1; a2 += x * u2; a3 += x * u3;
            b0 += y * u0; b1 += y * u1; b2 += y * u2; b3 += y * u3;
            if (++row == m) row = 0;
        }
        *(v16f *)(t0 + q) = a0; *(v16f *)(t0 + q + 16) = a1;
        *(v16f *)(t0 + q + 32) = a2; *(v16f *)(t0 + q + 48) = a3;
        *(v16f *)(t1 + q) = b0; *(v16f *)(t1 + q + 16) = b1;
        *(v16f *)(t1 + q + 32) = b2; *(v16f *)(t1 + q + 48) = b3;
    }
    if (q == k) return;
    const int64_t nb = (k - q) / 16, q8 = q + 16 * nb;
    const int has8 = (k - q8) >= 8;
    const int64_t qs = q8 + (has8 ? 8 : 0), ns = k - qs;
    v16f a0 = {0}, a1 = {0}, a2 = {0}, b0 = {0}, b1 = {0}, b2 = {0};
    v8f a8 = {0}, b8 = {0};
    float sa[8] = {0}, sb[8] = {0};
    int64_t row = row0;
    for (int64_t w = 0; w < W; ++w) {
        const float *u = Um + row * k;
        const float x = c0[w], y = c1[w];
        if (nb > 0) { const v16f v = *(const v16f *)(u + q); a0 += x * v; b0 += y * v; }
        if (nb > 1) { const v16f v = *(const v16f *)(u + q + 16); a1 += x * v; b1 += y * v; }
        if (nb > 2) { const v16f v = *(const v16f *)(u + q + 32); a2 += x * v; b2 += y * v; }
        if (has8) { const v8f v = *(const v8f *)(u + q8); a8 += x * v; b8 += y * v; }
        for (int64_t j = 0; j < ns; ++j) { sa[j] += x * u[qs + j]; sb[j] += y * u[qs + j]; }
        if (++row == m) row = 0;
    }
    if (nb > 0) { *(v16f *)(t0 + q) = a0; *(v16f *)(t1 + q) = b0; }
    if (nb > 1) { *(v16f *)(t0 + q + 16) = a1; *(v16f *)(t1 + q + 16) = b1; }
    if (nb > 2) { *(v16f *)(t0 + q + 32) = a2; *(v16f *)(t1 + q + 32) = b2; }
    if (has8) { *(v8f *)(t0 + q8) = a8; *(v8f *)(t1 + q8) = b8; }
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
