/* Compiled kernels of hbc's integer convolution (docs/quantization.md), called through ctypes
 * by hbc/ir/native.py, which checks every shape, dtype and constant range before a call.
 *
 * Pure integer arithmetic, so exactness needs no argument beyond the bounds the caller checks:
 * depthwise sums in int32 (the caller proves |sum| < 2^31 from the input's range and the
 * weights' L1 norms, as the numpy kernel does), everything after in int64, where every term of
 * the contract is below 2^62. Accumulators handed over in float arrays hold exact integers (the
 * numpy GEMM's proof), and a float-to-int64 conversion of an integer is exact. `>>` of a negative
 * int64 is an arithmetic shift on every compiler this builds with (GCC, Clang: documented). */

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__)
#define HBC_X86 1
#endif
#if defined(HBC_X86) && !defined(__clang__)
/* the portable loops: one build runs everywhere, the loader picks AVX2 code where it can */
#define HBC_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HBC_CLONES
#endif

/* The rescale of a qconv output channel: y = sat_[lo,hi](((a + b + r') * m + R) >> s) with the
 * residual r' = (res * mr + Rr) >> sr brought to the accumulator's scale. */
typedef struct {
    const int32_t *m, *s;  /* per output channel multiplier and shift */
    const int32_t *bias;   /* per channel, or NULL (already in the accumulator) */
    const void *res;       /* residual [N, C, P], int8 or int16 (res_bits), or NULL */
    const int32_t *mr, *sr;
    int32_t res_bits;
    int32_t out_bits;      /* 8 or 16 */
    int32_t lo, hi;
    void *out;             /* [N, C, P], int8 or int16 */
} hbc_epilogue;

static inline int64_t round_term(int32_t s) { return s ? (int64_t)1 << (s - 1) : 0; }

typedef void (*finish_fn)(const void *, int64_t, int64_t, int64_t, const hbc_epilogue *,
                          int64_t, int64_t);
typedef void (*evens_fn)(int8_t *restrict, const int8_t *restrict, int64_t);
typedef void (*taps_fn)(int32_t *restrict, const void *restrict, const int64_t *,
                        const int8_t *, int64_t, int64_t);

/* -- portable kernels ------------------------------------------------------------------------- */
/* finish `rows` runs of `len` accumulators of channel c (runs `stride` elements apart in acc),
 * stored contiguously from element `at` of out and res */
#define FINISH_RUN(NAME, ACC_T, HAS_RES, RES_T, OUT_T)                                           \
    HBC_CLONES static void NAME(const void *acc, int64_t rows, int64_t len, int64_t stride,     \
                                const hbc_epilogue *e, int64_t c, int64_t at) {                  \
        const ACC_T *a = (const ACC_T *)acc;                                                     \
        const int64_t m = e->m[c], b = e->bias ? e->bias[c] : 0;                                \
        const int32_t s = e->s[c];                                                               \
        const int64_t r = round_term(s), lo = e->lo, hi = e->hi;                                 \
        const RES_T *res = HAS_RES ? (const RES_T *)e->res + at : NULL;                          \
        const int64_t mr = HAS_RES ? e->mr[c] : 0;                                               \
        const int32_t sr = HAS_RES ? e->sr[c] : 0;                                               \
        const int64_t rr = round_term(sr);                                                       \
        OUT_T *out = (OUT_T *)e->out + at;                                                       \
        for (int64_t i = 0; i < rows; i++, a += stride, out += len) {                            \
            for (int64_t p = 0; p < len; p++) {                                                  \
                int64_t v = (int64_t)a[p] + b;                                                   \
                if (HAS_RES) v += ((int64_t)res[p] * mr + rr) >> sr;                             \
                v = (v * m + r) >> s;                                                            \
                out[p] = (OUT_T)(v < lo ? lo : v > hi ? hi : v);                                 \
            }                                                                                    \
            if (HAS_RES) res += len;                                                             \
        }                                                                                        \
    }

#define FINISH_FAMILY(ACC, ACC_T)                                                                \
    FINISH_RUN(finish_##ACC##_none_i8, ACC_T, 0, int8_t, int8_t)                                 \
    FINISH_RUN(finish_##ACC##_none_i16, ACC_T, 0, int8_t, int16_t)                               \
    FINISH_RUN(finish_##ACC##_i8_i8, ACC_T, 1, int8_t, int8_t)                                   \
    FINISH_RUN(finish_##ACC##_i8_i16, ACC_T, 1, int8_t, int16_t)                                 \
    FINISH_RUN(finish_##ACC##_i16_i8, ACC_T, 1, int16_t, int8_t)                                 \
    FINISH_RUN(finish_##ACC##_i16_i16, ACC_T, 1, int16_t, int16_t)

FINISH_FAMILY(f32, float)
FINISH_FAMILY(f64, double)
FINISH_FAMILY(i32, int32_t)

/* [acc kind: f32, f64, i32][residual: none, i8, i16][out: i8, i16] */
static const finish_fn finish_c[3][3][2] = {
    {{finish_f32_none_i8, finish_f32_none_i16}, {finish_f32_i8_i8, finish_f32_i8_i16},
     {finish_f32_i16_i8, finish_f32_i16_i16}},
    {{finish_f64_none_i8, finish_f64_none_i16}, {finish_f64_i8_i8, finish_f64_i8_i16},
     {finish_f64_i16_i8, finish_f64_i16_i16}},
    {{finish_i32_none_i8, finish_i32_none_i16}, {finish_i32_i8_i8, finish_i32_i8_i16},
     {finish_i32_i16_i8, finish_i32_i16_i16}},
};

/* acc[p] = sum_t w[t] * plane[off[t] + p] for p < run (a depthwise channel's kernel taps) */
#define TAPS_C(NAME, X_T)                                                                        \
    HBC_CLONES static void NAME(int32_t *restrict acc, const void *restrict plane_,             \
                                const int64_t *off, const int8_t *w, int64_t taps, int64_t run) { \
        const X_T *restrict plane = (const X_T *)plane_;                                         \
        for (int64_t p = 0; p < run; p++) acc[p] = 0;                                            \
        for (int64_t t = 0; t < taps; t++) {                                                     \
            const X_T *restrict src = plane + off[t];                                            \
            const int32_t wt = w[t];                                                             \
            for (int64_t p = 0; p < run; p++) acc[p] += wt * (int32_t)src[p];                    \
        }                                                                                        \
    }

/* dst[j] = src[2j] for j < n (a stride-2 phase of a row) */
HBC_CLONES static void evens_c(int8_t *restrict dst, const int8_t *restrict src, int64_t n) {
    for (int64_t j = 0; j < n; j++) dst[j] = src[2 * j];
}

TAPS_C(taps_c_i8, int8_t)
TAPS_C(taps_c_i16, int16_t)

#ifdef HBC_X86
#include "_qkernels_x86.h"
#endif

/* -- dispatch --------------------------------------------------------------------------------- */
static int cpu_features(void) {
#ifdef HBC_X86
    return hbc_x86_features();
#else
    return 0;
#endif
}

static int features = -1;

/* bit 0: AVX-512 kernels, bit 1: VNNI matrix products (x86-64 only) */
int hbc_features(void) {
    if (features < 0) features = cpu_features();
    return features;
}

/* use only the CPU's features in mask from now on (tests run the portable kernels with 0);
 * returns the features used before */
int hbc_limit_features(int mask) {
    const int before = hbc_features();
    features = cpu_features() & mask;
    return before;
}

static finish_fn pick_finish(int acc_kind, const hbc_epilogue *e) {
    const int res = e->res ? (e->res_bits == 16 ? 2 : 1) : 0, out = e->out_bits == 16;
#ifdef HBC_X86
    if (hbc_features() & HBC_HAS_AVX512) return finish_avx[acc_kind][res][out];
#endif
    return finish_c[acc_kind][res][out];
}

static evens_fn pick_evens(void) {
#ifdef HBC_X86
    if (hbc_features() & HBC_HAS_AVX512) return evens_avx;
#endif
    return evens_c;
}

static taps_fn pick_taps(int x_bits) {
#ifdef HBC_X86
    if (hbc_features() & HBC_HAS_AVX512) return x_bits == 16 ? taps_avx_i16 : taps_avx_i8;
#endif
    return x_bits == 16 ? taps_c_i16 : taps_c_i8;
}

/* -- entry points ----------------------------------------------------------------------------- */
/* The rescale of accumulators acc [N, C, P] (rows of P elements, `row_stride` elements apart,
 * N*C rows in order; acc_kind 0 float32, 1 float64, 2 int32) into e->out [N, C, P]. */
int hbc_qconv_finish(const void *acc, int32_t acc_kind, int64_t rows, int64_t channels,
                     int64_t len, int64_t row_stride, const hbc_epilogue *e) {
    static const size_t item[3] = {4, 8, 4};
    if (acc_kind < 0 || acc_kind > 2) return -1;
    finish_fn fn = pick_finish(acc_kind, e);
    for (int64_t i = 0; i < rows; i++)
        fn((const char *)acc + (size_t)(i * row_stride) * item[acc_kind], 1, len, len, e,
           i % channels, i * len);
    return 0;
}

/* Depthwise 2-D convolution (one input channel per output channel) of x [N, C, H, W] (int8 or
 * int16, x_bits) with w [C, KH, KW] int8, fused with the rescale. Each channel's zero-padded
 * plane is stored by stride phase (padded element (y, x) in phase (y % sh, x % sw) at
 * (y / sh, x / sw), phases of hq x wq), so output (o, p) of tap (a, b) reads element
 * (o + a*dh / sh, p + b*dw / sw) of one phase: on the phase's flattened rows every tap is one
 * contiguous run over the output grid o * wq + p, summed in int32 (columns p >= ow are computed
 * and dropped), then each channel is finished in one call. */
#define FILL_PLANE(NAME, X_T, EVENS)                                                             \
    HBC_CLONES static void NAME(X_T *restrict plane, const X_T *restrict x, int64_t h,          \
                                int64_t wd, int64_t hp, int64_t wp, int64_t hq, int64_t wq,      \
                                int64_t sh, int64_t sw, int64_t pt, int64_t pl, evens_fn evens) { \
        for (int64_t y = 0; y < hp; y++) {                                                       \
            const int64_t sy = y - pt;                                                           \
            if (sy < 0 || sy >= h) continue;                                                     \
            for (int64_t q = 0; q < sw; q++) {                                                   \
                /* phase q holds padded columns j*sw + q, source columns j*sw + q - pl */        \
                const int64_t j0 = pl > q ? (pl - q + sw - 1) / sw : 0;                          \
                int64_t j1 = (wd + pl - q + sw - 1) / sw;                                        \
                const int64_t jmax = (wp - q + sw - 1) / sw;                                     \
                if (j1 > jmax) j1 = jmax;                                                        \
                if (j0 >= j1) continue;                                                          \
                X_T *restrict dst = plane + (((y % sh) * sw + q) * hq + y / sh) * wq;            \
                const X_T *restrict src = x + sy * wd + q - pl;                                  \
                if (sw == 1)                                                                     \
                    memcpy(dst + j0, src + j0, sizeof(X_T) * (size_t)(j1 - j0));                 \
                else if (EVENS && sw == 2)                                                       \
                    evens((int8_t *)(dst + j0), (const int8_t *)(src + 2 * j0), j1 - j0);        \
                else                                                                             \
                    for (int64_t j = j0; j < j1; j++) dst[j] = src[j * sw];                      \
            }                                                                                    \
        }                                                                                        \
    }

FILL_PLANE(fill_plane_i8, int8_t, 1)
FILL_PLANE(fill_plane_i16, int16_t, 0)

int hbc_qconv_depthwise(const void *x, int32_t x_bits, const int8_t *w, int64_t n, int64_t c,
                        int64_t h, int64_t wd, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                        int64_t dh, int64_t dw, int64_t pt, int64_t pl, int64_t oh,
                        int64_t ow, const hbc_epilogue *e) {
    const int64_t hp = (oh - 1) * sh + (kh - 1) * dh + 1;  /* rows and columns read */
    const int64_t wp = (ow - 1) * sw + (kw - 1) * dw + 1;
    const int64_t hq = (hp + sh - 1) / sh, wq = (wp + sw - 1) / sw;  /* per phase */
    const int64_t run = (oh - 1) * wq + ow;                 /* flat output grid */
    const size_t plane_size = (size_t)(sh * sw * hq * wq), item = x_bits == 16 ? 2 : 1;
    int32_t *acc = malloc(sizeof(int32_t) * (size_t)run);
    void *plane = malloc(item * plane_size);
    int64_t *off = malloc(sizeof(int64_t) * (size_t)(kh * kw));
    if (!acc || !plane || !off) {
        free(acc), free(plane), free(off);
        return -2;
    }
    for (int64_t a = 0; a < kh; a++)
        for (int64_t b = 0; b < kw; b++) {
            const int64_t ry = a * dh, rx = b * dw;  /* the tap's phase and offset in it */
            off[a * kw + b] = ((ry % sh) * sw + rx % sw) * hq * wq + (ry / sh) * wq + rx / sw;
        }
    const finish_fn finish = pick_finish(2, e);
    const taps_fn taps = pick_taps(x_bits);
    const evens_fn evens = pick_evens();
    for (int64_t i = 0; i < n * c; i++) {
        const int64_t ch = i % c;
        memset(plane, 0, item * plane_size);
        if (x_bits == 16)
            fill_plane_i16(plane, (const int16_t *)x + i * h * wd, h, wd, hp, wp, hq, wq, sh, sw,
                           pt, pl, NULL);
        else
            fill_plane_i8(plane, (const int8_t *)x + i * h * wd, h, wd, hp, wp, hq, wq, sh, sw,
                          pt, pl, evens);
        taps(acc, plane, off, w + ch * kh * kw, kh * kw, run);
        if (wq != ow)  /* drop the grid's extra columns: one long run vectorizes best */
            for (int64_t o = 1; o < oh; o++)
                memmove(acc + o * ow, acc + o * wq, sizeof(int32_t) * (size_t)ow);
        finish(acc, 1, oh * ow, oh * ow, e, ch, i * oh * ow);
    }
    free(acc), free(plane), free(off);
    return 0;
}

/* acc [G, Mp, acc_stride] int32 = wq[g] @ x[g] exactly for x [G, K, P] int8 and the prepacked
 * weights wq [G, Mp, Kp] int8 with corr [G, Mp] (see gemm_vnni); columns past P of acc are
 * scratch, acc_stride >= 16 * ceil(P / 16). -3 where the CPU has no VNNI. */
int hbc_qgemm_s8(int32_t *acc, const int8_t *wq, const int32_t *corr, const int8_t *x,
                 int64_t groups, int64_t mp, int64_t k, int64_t p, int64_t acc_stride) {
#ifdef HBC_X86
    if (!(hbc_features() & HBC_HAS_VNNI)) return -3;
    const int64_t kp = (k + 3) / 4 * 4, blocks = (p + 15) / 16;
    if (acc_stride < blocks * 16 || mp % 4) return -1;
    uint8_t *xpack = malloc((size_t)(blocks * kp * 16 + 64));
    if (!xpack) return -2;
    for (int64_t g = 0; g < groups; g++)
        gemm_vnni(acc + g * mp * acc_stride, acc_stride, wq + g * mp * kp, corr + g * mp,
                  x + g * k * p, mp, k, p, xpack);
    free(xpack);
    return 0;
#else
    (void)acc, (void)wq, (void)corr, (void)x, (void)groups, (void)mp, (void)k, (void)p;
    (void)acc_stride;
    return -3;
#endif
}
