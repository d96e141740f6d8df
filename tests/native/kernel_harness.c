/* Runs one kernel of scatstore/transforms/_cpu_kernels.c on arrays read from a file and writes
 * the result to another: the kernels' unit test for targets this machine cannot run natively
 * (built with a cross compiler, run under qemu-user; tests/test_native_cross.py writes the
 * inputs and compares the output with a reference computed on the host).
 *
 *   kernel_harness KERNEL IN OUT      KERNEL: fft | prod | modulus | lowpass | vf
 *
 * IN: a sequence of arrays, each an int64 type (0 float32, 1 int32, 2 int64), an int64 count,
 * then the raw little-endian values. Array 0 is the int64 parameters of the kernel. OUT: the
 * float32 result, raw. */
#include <stdio.h>
#include <stdlib.h>
#include "../../scatstore/transforms/_cpu_kernels.c"

#define MAXA 16
static void *arr[MAXA];
static int64_t cnt[MAXA];

static int read_arrays(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    int n = 0;
    int64_t hdr[2];
    while (n < MAXA && fread(hdr, 8, 2, f) == 2) {
        const size_t sz = hdr[0] == 2 ? 8 : 4;
        arr[n] = malloc(hdr[1] * sz + 64);
        cnt[n] = hdr[1];
        if (fread(arr[n], sz, hdr[1], f) != (size_t)hdr[1]) { fclose(f); return -1; }
        ++n;
    }
    fclose(f);
    return n;
}

static int write_out(const char *path, const float *x, int64_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f) return 1;
    const int ok = fwrite(x, 4, n, f) == (size_t)n;
    fclose(f);
    return !ok;
}

int main(int argc, char **argv)
{
    if (argc == 2 && !strcmp(argv[1], "vf")) { printf("%lld\n", (long long)sc_vector_floats()); return 0; }
    if (argc != 4 || read_arrays(argv[2]) < 1) { fprintf(stderr, "usage / input error\n"); return 2; }
    const int64_t *p = arr[0];
    const char *k = argv[1];
    if (!strcmp(k, "fft")) {            /* p: n_maps m k inverse; data rad_m tw_m rad_k tw_k */
        const int64_t nmax = p[1] > p[2] ? p[1] : p[2];
        float *work = malloc(2 * nmax * 64);
        sc_fft2(arr[1], p[0], p[1], p[2], arr[2], cnt[2], arr[3], arr[4], cnt[4], arr[5], p[3],
                work);
        return write_out(argv[3], arr[1], cnt[1]);
    }
    if (!strcmp(k, "prod")) {           /* p: n_u n_f M N s n_boxes; U u_off F boxes */
        const int64_t n = p[0] * p[1] * (p[2] / p[4]) * (p[3] / p[4]) * 2;
        float *Z = malloc(n * 4);
        sc_prod_periodize(arr[1], arr[2], p[0], arr[3], p[1], p[2], p[3], p[4], arr[4], p[5], Z);
        return write_out(argv[3], Z, n);
    }
    if (!strcmp(k, "modulus")) {        /* p: n_maps len out_len; Z out_off scale(f32) */
        float *o = calloc(p[2], 4);
        sc_modulus(arr[1], p[0], p[1], o, arr[2], ((float *)arr[3])[0]);
        return write_out(argv[3], o, p[2]);
    }
    if (!strcmp(k, "lowpass")) {        /* p: n_maps m k Mo Wa No Wb out_len; U r0 ca c0 cb off */
        float *o = calloc(p[7], 4);
        const int64_t mp = (p[3] + 15) / 16 * 16;
        float *scratch = malloc((p[3] * p[2] + (p[2] + p[5]) * mp) * 4);
        sc_lowpass(arr[1], p[0], p[1], p[2], arr[2], arr[3], p[3], p[4], arr[4], arr[5], p[5],
                   p[6], scratch, o, arr[6]);
        return write_out(argv[3], o, p[7]);
    }
    fprintf(stderr, "unknown kernel %s\n", k);
    return 2;
}
