/* Conversion kernels of the loader: stored dtype -> model input, on the CPU.
 *
 * Built by scatstore/loaders/convert.py through scatstore/_cbuild.py for ONE ISA level, chosen
 * from the CPU's features (-march=x86-64-v4 / x86-64-v3 / x86-64-v2 / armv8-a / generic); the
 * preprocessor then picks the variant below, and cv_kernel() names it. Nothing is chosen by
 * timing.
 *
 *   cv_f16_to_f32   IEEE binary16 -> binary32, exact (every half is a float): AVX-512F
 *                   vcvtph2ps zmm (16 per instruction), F16C vcvtph2ps ymm (8), NEON fcvtl (4),
 *                   or a branch-free integer routine the compiler vectorises (no denormal
 *                   float arithmetic, so flush-to-zero / denormals-are-zero modes do not change
 *                   the result).
 *   cv_gather_copy  samples copied from a mapped file / decoded chunk to their batch rows
 *   cv_u8_affine    uint8 codes -> float32, per map m:  q * a[m] + b[m]          (affine)
 *   cv_u8_sqrt      uint8 codes -> float32, per map m:  (q * a[m])^2 + b[m]      (sqrt companding)
 *   cv_u8_norm      uint8 pixels -> float32, per map m: (q * a - b[m]) / c[m]    (x/255, mean, std)
 *
 * The uint8 kernels compute in float32 in exactly the order written (built with
 * -ffp-contract=off: no fused multiply-add), so their results are bit-identical to
 * scatstore.transforms.quantize.dequantize_uint8 in numpy and torch.
 *
 * All functions are plain loops over contiguous memory; they hold no state and may run on
 * several threads at once on disjoint outputs (ctypes releases the GIL around each call).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__AVX512F__) || defined(__F16C__))
#include <immintrin.h>
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#if defined(__x86_64__) && defined(__AVX512F__)
#define CV_KERNEL "avx512f-vcvtph2ps"
#elif defined(__x86_64__) && defined(__F16C__) && defined(__AVX__)
#define CV_KERNEL "f16c-avx2-vcvtph2ps"
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define CV_KERNEL "neon-fcvtl"
#else
#define CV_KERNEL "generic-c"
#endif

const char *cv_kernel(void) { return CV_KERNEL; }

/* binary16 -> binary32 with integer operations only (vectorisable, no denormal arithmetic). */
static inline uint32_t half_bits_to_float_bits(uint32_t h)
{
    uint32_t sign = (h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;
    uint32_t normal = ((e + 112u) << 23) | (m << 13);
    uint32_t infnan = 0x7f800000u | (m << 13);
    /* subnormal half (e == 0): m * 2^-24 = 2^(p-24) * (m / 2^p), p = index of m's top bit;
       computed as the float of m (exact, m < 1024) scaled by 2^-24 in the exponent field. */
    float fm = (float)m;
    uint32_t fb;
    memcpy(&fb, &fm, 4);
    uint32_t sub = m ? fb - (24u << 23) : 0u;
    uint32_t r = e == 0x1fu ? infnan : (e == 0 ? sub : normal);
    return sign | r;
}

static void f16_to_f32_tail(const uint16_t *src, float *dst, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        uint32_t b = half_bits_to_float_bits(src[i]);
        memcpy(dst + i, &b, 4);
    }
}

/* Outputs larger than this are written with non-temporal (streaming) stores: a batch of
 * 256 scat1 samples is 60 MB of float32, far beyond the caches, and streaming stores skip the
 * read-for-ownership of every destination line (measured here: 2.4x the rate of plain stores
 * at batch 256; plain stores win below a few MB, where the output stays in cache). A size
 * rule, not a timing: the values written are the same either way. */
#define CV_STREAM_BYTES (4 << 20)

/* x86: one vector of CV_W floats per conversion instruction, the rest written once for both */
#if defined(__x86_64__) && defined(__AVX512F__)
#define CV_W 16
#define CV_LOADH(p) _mm256_loadu_si256((const __m256i *)(p))
#define CV_CVT(h) _mm512_cvtph_ps(h)
#define CV_STORE(p, v) _mm512_storeu_ps((p), (v))
#define CV_STREAM(p, v) _mm512_stream_ps((p), (v))
#elif defined(__x86_64__) && defined(__F16C__) && defined(__AVX__)
#define CV_W 8
#define CV_LOADH(p) _mm_loadu_si128((const __m128i *)(p))
#define CV_CVT(h) _mm256_cvtph_ps(h)
#define CV_STORE(p, v) _mm256_storeu_ps((p), (v))
#define CV_STREAM(p, v) _mm256_stream_ps((p), (v))
#endif

static void f16_to_f32(const uint16_t *src, float *dst, int64_t n, int stream)
{
    int64_t i = 0;
    (void)stream;
#if defined(CV_W)
    const int64_t vb = CV_W * 4; /* vector bytes: streaming stores need aligned destinations */
    if (stream && (uintptr_t)dst % 4 == 0) {
        int64_t head = (int64_t)((vb - ((uintptr_t)dst & (vb - 1))) & (vb - 1)) / 4;
        if (head <= n) {
            f16_to_f32_tail(src, dst, head);
            for (i = head; i + 4 * CV_W <= n; i += 4 * CV_W)
                for (int k = 0; k < 4; k++)
                    CV_STREAM(dst + i + k * CV_W, CV_CVT(CV_LOADH(src + i + k * CV_W)));
            _mm_sfence();
        }
    }
    for (; i + CV_W <= n; i += CV_W)
        CV_STORE(dst + i, CV_CVT(CV_LOADH(src + i)));
#elif defined(__aarch64__) && defined(__ARM_NEON)
    for (; i + 16 <= n; i += 16) {
        uint16x8_t a = vld1q_u16(src + i), b = vld1q_u16(src + i + 8);
        vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(a))));
        vst1q_f32(dst + i + 4, vcvt_high_f32_f16(vreinterpretq_f16_u16(a)));
        vst1q_f32(dst + i + 8, vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(b))));
        vst1q_f32(dst + i + 12, vcvt_high_f32_f16(vreinterpretq_f16_u16(b)));
    }
#endif
    f16_to_f32_tail(src + i, dst + i, n - i);
}

void cv_f16_to_f32(const uint16_t *src, float *dst, int64_t n)
{
    f16_to_f32(src, dst, n, n * 4 >= CV_STREAM_BYTES);
}

/* n samples of elems halves each, at base + src_off[k] (bytes), converted to the float32 rows
 * at the addresses dst[k]: a bulk reader's converting read (from a mapped file or a decoded
 * chunk straight into the batch, one pass). */
void cv_gather_f16_to_f32(const uint8_t *base, const int64_t *src_off, const int64_t *dst,
                          int64_t n, int64_t elems)
{
    int stream = n * elems * 4 >= CV_STREAM_BYTES;
    for (int64_t k = 0; k < n; k++)
        f16_to_f32((const uint16_t *)(base + src_off[k]), (float *)(intptr_t)dst[k], elems, stream);
}

/* n samples of nbytes bytes each, at base + src_off[k], copied to the addresses dst[k]: the
 * mapped read of samples kept in their stored dtype (page-cache pages touched through the map
 * instead of read() into the buffer: several times faster per thread). */
void cv_gather_copy(const uint8_t *base, const int64_t *src_off, const int64_t *dst, int64_t n,
                    int64_t nbytes)
{
    for (int64_t k = 0; k < n; k++)
        memcpy((void *)(intptr_t)dst[k], base + src_off[k], (size_t)nbytes);
}

/* uint8 kernels: n_maps maps of map_len values each, contiguous; per map m the scale a[m * as]
 * (as = 0: one scale for all), the offset b[m] and, for mode CV_NORM, the divisor c[m]. */
enum { CV_AFFINE, CV_SQRT, CV_NORM };

static inline void u8_kernel(const uint8_t *src, float *dst, const float *a, int64_t as,
                             const float *b, const float *c, int64_t n_maps, int64_t map_len,
                             const int mode)
{
    for (int64_t m = 0; m < n_maps; m++) {
        const uint8_t *s = src + m * map_len;
        float *d = dst + m * map_len;
        const float am = a[m * as], bm = b[m], cm = mode == CV_NORM ? c[m] : 1.0f;
        for (int64_t i = 0; i < map_len; i++) {
            float t = (float)s[i] * am;
            if (mode == CV_SQRT)
                t = t * t;
            if (mode == CV_NORM) {
                float u = t - bm;
                d[i] = u / cm;
            } else {
                d[i] = t + bm;
            }
        }
    }
}

void cv_u8_affine(const uint8_t *src, float *dst, const float *a, const float *b,
                  int64_t n_maps, int64_t map_len)
{
    u8_kernel(src, dst, a, 1, b, NULL, n_maps, map_len, CV_AFFINE);
}

void cv_u8_sqrt(const uint8_t *src, float *dst, const float *a, const float *b,
                int64_t n_maps, int64_t map_len)
{
    u8_kernel(src, dst, a, 1, b, NULL, n_maps, map_len, CV_SQRT);
}

void cv_u8_norm(const uint8_t *src, float *dst, float a, const float *b, const float *c,
                int64_t n_maps, int64_t map_len)
{
    u8_kernel(src, dst, &a, 0, b, c, n_maps, map_len, CV_NORM);
}
