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

/* counts[b*levels + l] = #{p : idx[b*n + p] == l} */
void hg_count(const uint8_t *idx, int64_t images, int64_t n, int64_t levels, int64_t *counts)
{
    memset(counts, 0, (size_t)(images * levels) * sizeof(int64_t));
    for (int64_t b = 0; b < images; b++) {
        const uint8_t *ib = idx + b * n;
        int64_t *cb = counts + b * levels;
        for (int64_t p = 0; p < n; p++)
            cb[ib[p]]++;
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
