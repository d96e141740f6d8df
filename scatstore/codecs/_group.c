/* The scale hyperprior's symbol grouping (scatstore/codecs/hyper.py), one pass per image.
 *
 * A version-2 bitstream codes an image's latent symbols grouped by scale index (ascending), each
 * group in raster order of (c, i, j): a stable counting sort by index. NumPy does it with an
 * argsort, a bincount and two gathers (about 5 passes over the data and three temporaries per
 * image); these kernels do it in two passes. Integer code only: the result is the same on every
 * machine, and equal to the NumPy path (tested).
 *
 * levels: the number of scale indices (64); idx values are < levels (checked by the caller).
 */
#include <stdint.h>
#include <string.h>

#define MAX_LEVELS 256

/* start[l]: where image b's group of index l begins in the stream order */
static void starts(const int64_t *counts_b, int64_t levels, int64_t *start)
{
    int64_t acc = 0;
    for (int64_t l = 0; l < levels; l++) {
        start[l] = acc;
        acc += counts_b[l];
    }
}

/* counts[b*levels + l] = #{p : idx[b*n + p] == l}; four partial histograms, so that equal
 * neighbouring indices (the scale map is smooth) do not wait on each other's increments */
void hg_count(const uint8_t *idx, int64_t images, int64_t n, int64_t levels, int64_t *counts)
{
    int64_t part[4][MAX_LEVELS];
    for (int64_t b = 0; b < images; b++) {
        const uint8_t *ib = idx + b * n;
        int64_t *cb = counts + b * levels, p = 0;
        memset(part, 0, sizeof(part));
        for (; p + 4 <= n; p += 4) {
            part[0][ib[p]]++;
            part[1][ib[p + 1]]++;
            part[2][ib[p + 2]]++;
            part[3][ib[p + 3]]++;
        }
        for (; p < n; p++)
            part[0][ib[p]]++;
        for (int64_t l = 0; l < levels; l++)
            cb[l] = part[0][l] + part[1][l] + part[2][l] + part[3][l];
    }
}

/* Encoder side: rel[b, k] = sym[b, p] - lo[idx[b, p]] for the k-th symbol of the stream order
 * (stable by index), and the counts. Returns the number of symbols outside [0, length) of their
 * table (the caller refuses them; rel is then unspecified). */
int64_t hg_group(const uint8_t *idx, const int32_t *sym, int64_t images, int64_t n,
                 int64_t levels, const int32_t *lo, const int32_t *length, int32_t *rel,
                 int64_t *counts)
{
    int64_t bad = 0, start[MAX_LEVELS];
    hg_count(idx, images, n, levels, counts);
    for (int64_t b = 0; b < images; b++) {
        const uint8_t *ib = idx + b * n;
        const int32_t *sb = sym + b * n;
        int32_t *rb = rel + b * n;
        starts(counts + b * levels, levels, start);
        for (int64_t p = 0; p < n; p++) {
            const uint8_t l = ib[p];
            const int64_t r = (int64_t)sb[p] - lo[l];
            bad += (r < 0) | (r >= length[l]);
            rb[start[l]++] = (int32_t)r;
        }
    }
    return bad;
}

/* Decoder side: out[b, p] = vals[b, k] + offset[idx[b, p]], k the position of p in the stream
 * order; counts from hg_count. */
void hg_ungroup(const uint8_t *idx, const int32_t *vals, int64_t images, int64_t n,
                int64_t levels, const int64_t *counts, const int32_t *offset, int32_t *out)
{
    int64_t start[MAX_LEVELS];
    for (int64_t b = 0; b < images; b++) {
        const uint8_t *ib = idx + b * n;
        const int32_t *vb = vals + b * n;
        int32_t *ob = out + b * n;
        starts(counts + b * levels, levels, start);
        for (int64_t p = 0; p < n; p++) {
            const uint8_t l = ib[p];
            ob[p] = vb[start[l]++] + offset[l];
        }
    }
}

/* The integer network's last step, fused: index[b, c, y, x] = clamp(floor(acc·scale[c] + 1/2),
 * 0, levels − 1) from the float32 accumulator in channels-last layout (b, y, x, c), cropped to
 * (h, w) of the (hh, ww) map. scale[c] is a power of two and acc an integer below 2^24, so the
 * product is exact and the float32 arithmetic is torch's, operation for operation (built with
 * -ffp-contract=off: no fused multiply-add); for 1 <= v < top, truncation is the floor. */
void hg_index(const float *acc, int64_t images, int64_t hh, int64_t ww, int64_t channels,
              const float *scale, int64_t h, int64_t w, int64_t levels, uint8_t *out)
{
    const float top = (float)(levels - 1);
    for (int64_t b = 0; b < images; b++)
        for (int64_t y = 0; y < h; y++)
            for (int64_t x = 0; x < w; x++) {
                const float *a = acc + ((b * hh + y) * ww + x) * channels;
                uint8_t *o = out + b * channels * h * w + y * w + x;
                for (int64_t c = 0; c < channels; c++) {
                    const float v = a[c] * scale[c] + 0.5f;  /* floor(v) clamped to [0, top]: */
                    o[c * h * w] = v < 1.0f ? 0 : (v >= top ? (uint8_t)top : (uint8_t)(int32_t)v);
                }
            }
}
