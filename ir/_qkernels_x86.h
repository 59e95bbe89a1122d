/* x86-64 AVX-512 kernels of ir/_qkernels.c, chosen at run time where the CPU has the features
 * (hbc_x86_features); the portable C of that file serves every other CPU. Masked loads and
 * stores handle any run length in whole vectors, which matters for the short runs of small
 * feature maps (7x7: 49 elements) that the compiler's vectorized loops would run scalar. */

#include <immintrin.h>

#define HBC_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define HBC_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

enum { HBC_HAS_AVX512 = 1, HBC_HAS_VNNI = 2 };

static int hbc_x86_features(void) {
    __builtin_cpu_init();
    int f = 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
        f |= HBC_HAS_AVX512;
        if (__builtin_cpu_supports("avx512vnni")) f |= HBC_HAS_VNNI;
    }
    return f;
}

/* -- the rescale, 8 int64 lanes (the contract's arithmetic, exactly) ------------------------ */
HBC_AVX512 static inline __m512i ld_f32(const float *a, __mmask8 k) {
    return _mm512_cvtps_epi64(_mm256_maskz_loadu_ps(k, a));  /* integers: exact */
}
HBC_AVX512 static inline __m512i ld_f64(const double *a, __mmask8 k) {
    return _mm512_cvtpd_epi64(_mm512_maskz_loadu_pd(k, a));
}
HBC_AVX512 static inline __m512i ld_i32(const int32_t *a, __mmask8 k) {
    return _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(k, a));
}
HBC_AVX512 static inline __m512i ld_i8(const int8_t *a, __mmask8 k) {
    return _mm512_cvtepi8_epi64(_mm_maskz_loadu_epi8(k, a));
}
HBC_AVX512 static inline __m512i ld_i16(const int16_t *a, __mmask8 k) {
    return _mm512_cvtepi16_epi64(_mm_maskz_loadu_epi16(k, a));
}
HBC_AVX512 static inline void st_i8(int8_t *o, __mmask8 k, __m512i v) {
    _mm512_mask_cvtepi64_storeu_epi8(o, k, v);  /* v is clamped to the range: no truncation */
}
HBC_AVX512 static inline void st_i16(int16_t *o, __mmask8 k, __m512i v) {
    _mm512_mask_cvtepi64_storeu_epi16(o, k, v);
}

#define FINISH_AVX(NAME, ACC, ACC_T, HAS_RES, RES, RES_T, OUT, OUT_T)                            \
    HBC_AVX512 static void NAME(const void *acc, int64_t rows, int64_t len, int64_t stride,     \
                                const hbc_epilogue *e, int64_t c, int64_t at) {                  \
        const ACC_T *a = (const ACC_T *)acc;                                                     \
        const __m512i m = _mm512_set1_epi64(e->m[c]);                                            \
        const __m512i b = _mm512_set1_epi64(e->bias ? e->bias[c] : 0);                           \
        const __m512i r = _mm512_set1_epi64(round_term(e->s[c]));                                \
        const __m128i s = _mm_cvtsi32_si128(e->s[c]);                                            \
        const __m512i lo = _mm512_set1_epi64(e->lo), hi = _mm512_set1_epi64(e->hi);             \
        const RES_T *res = HAS_RES ? (const RES_T *)e->res + at : NULL;                          \
        const __m512i mr = _mm512_set1_epi64(HAS_RES ? e->mr[c] : 0);                            \
        const __m512i rr = _mm512_set1_epi64(HAS_RES ? round_term(e->sr[c]) : 0);                \
        const __m128i sr = _mm_cvtsi32_si128(HAS_RES ? e->sr[c] : 0);                            \
        OUT_T *out = (OUT_T *)e->out + at;                                                       \
        for (int64_t i = 0; i < rows; i++, a += stride, out += len) {                            \
            for (int64_t p = 0; p < len; p += 8) {                                               \
                const __mmask8 k = len - p >= 8 ? 0xFF : (__mmask8)((1u << (len - p)) - 1);     \
                __m512i v = _mm512_add_epi64(ld_##ACC(a + p, k), b);                             \
                if (HAS_RES) {                                                                   \
                    const __m512i t = _mm512_mullo_epi64(ld_##RES(res + p, k), mr);              \
                    v = _mm512_add_epi64(v, _mm512_sra_epi64(_mm512_add_epi64(t, rr), sr));      \
                }                                                                                \
                v = _mm512_sra_epi64(_mm512_add_epi64(_mm512_mullo_epi64(v, m), r), s);          \
                st_##OUT(out + p, k, _mm512_max_epi64(lo, _mm512_min_epi64(hi, v)));             \
            }                                                                                    \
            if (HAS_RES) res += len;                                                             \
        }                                                                                        \
    }

#define FINISH_AVX_FAMILY(ACC, ACC_T)                                                            \
    FINISH_AVX(finish_avx_##ACC##_none_i8, ACC, ACC_T, 0, i8, int8_t, i8, int8_t)                \
    FINISH_AVX(finish_avx_##ACC##_none_i16, ACC, ACC_T, 0, i8, int8_t, i16, int16_t)             \
    FINISH_AVX(finish_avx_##ACC##_i8_i8, ACC, ACC_T, 1, i8, int8_t, i8, int8_t)                  \
    FINISH_AVX(finish_avx_##ACC##_i8_i16, ACC, ACC_T, 1, i8, int8_t, i16, int16_t)               \
    FINISH_AVX(finish_avx_##ACC##_i16_i8, ACC, ACC_T, 1, i16, int16_t, i8, int8_t)               \
    FINISH_AVX(finish_avx_##ACC##_i16_i16, ACC, ACC_T, 1, i16, int16_t, i16, int16_t)

FINISH_AVX_FAMILY(f32, float)
FINISH_AVX_FAMILY(f64, double)
FINISH_AVX_FAMILY(i32, int32_t)

/* [acc kind][residual: none, i8, i16][out: i8, i16] */
static const finish_fn finish_avx[3][3][2] = {
    {{finish_avx_f32_none_i8, finish_avx_f32_none_i16}, {finish_avx_f32_i8_i8, finish_avx_f32_i8_i16},
     {finish_avx_f32_i16_i8, finish_avx_f32_i16_i16}},
    {{finish_avx_f64_none_i8, finish_avx_f64_none_i16}, {finish_avx_f64_i8_i8, finish_avx_f64_i8_i16},
     {finish_avx_f64_i16_i8, finish_avx_f64_i16_i16}},
    {{finish_avx_i32_none_i8, finish_avx_i32_none_i16}, {finish_avx_i32_i8_i8, finish_avx_i32_i8_i16},
     {finish_avx_i32_i16_i8, finish_avx_i32_i16_i16}},
};

/* -- depthwise taps, 16 int32 lanes: all taps of 16 outputs in a register, stored once ------- */
#define TAPS_AVX(NAME, X_T, LOAD)                                                                \
    HBC_AVX512 static void NAME(int32_t *restrict acc, const void *restrict plane_,             \
                                const int64_t *off, const int8_t *w, int64_t taps, int64_t run) { \
        const X_T *plane = (const X_T *)plane_;                                                  \
        for (int64_t p = 0; p < run; p += 16) {                                                  \
            const __mmask16 k = run - p >= 16 ? 0xFFFF : (__mmask16)((1u << (run - p)) - 1);     \
            __m512i v = _mm512_setzero_si512();                                                  \
            for (int64_t t = 0; t < taps; t++) {                                                 \
                const X_T *src = plane + off[t] + p;                                             \
                v = _mm512_add_epi32(v, _mm512_mullo_epi32(LOAD, _mm512_set1_epi32(w[t])));      \
            }                                                                                    \
            _mm512_mask_storeu_epi32(acc + p, k, v);                                             \
        }                                                                                        \
    }

TAPS_AVX(taps_avx_i8, int8_t, _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, src)))
TAPS_AVX(taps_avx_i16, int16_t, _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(k, src)))

/* dst[j] = src[2j] for j < n: the low bytes of 16-bit lanes (vpmovwb), 32 at a time; the
 * masked load reads only bytes up to src[2(n-1)] */
HBC_AVX512 static void evens_avx(int8_t *restrict dst, const int8_t *restrict src, int64_t n) {
    for (int64_t j = 0; j < n; j += 32) {
        const int64_t left = n - j, bytes = 2 * left - 1 < 64 ? 2 * left - 1 : 64;
        const __mmask64 lm = bytes == 64 ? ~(__mmask64)0 : (((__mmask64)1 << bytes) - 1);
        const __mmask32 sm = left >= 32 ? ~(__mmask32)0 : (((__mmask32)1 << left) - 1);
        const __m512i v = _mm512_maskz_loadu_epi8(lm, src + 2 * j);
        _mm256_mask_storeu_epi8(dst + j, sm, _mm512_cvtepi16_epi8(v));
    }
}

/* -- int8 matrix products with VNNI ----------------------------------------------------------- */
/* acc[m, p] = sum_k w[m, k] x[k, p] exactly, for w prepacked by the caller as [Mp, Kp] int8 (rows
 * padded to Kp = 4 * ceil(K / 4) and Mp = 4 * ceil(M / 4) with zeros) and corr[m] = 128 *
 * sum_k w[m, k]. vpdpbusd sums four u8 * s8 products into each int32 lane: x is offset to u8
 * (x ^ 0x80 = x + 128) and packed per block of 16 columns as [Kp/4][16][4], a lane holds one
 * output column, a broadcast weight quadruple supplies the s8 side, and corr takes the offset
 * back. The sums wrap modulo 2^32, so the result is exact whenever the true sum fits int32 (the
 * caller checks 128 * ||w[m]||_1 < 2^31); partial sums of the offset products may wrap on the
 * way without harm. */
HBC_VNNI static void pack_x(uint8_t *restrict dst, const int8_t *restrict x, int64_t k,
                            int64_t p, int64_t kp, int64_t blocks) {
    /* dst[(b * kp/4 + g) * 64 + j * 4 + i] = x[4g + i, 16b + j] + 128, zero past the edges */
    const __m128i flip = _mm_set1_epi8((char)0x80);
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t col = b * 16;
        const int64_t width = p - col < 16 ? p - col : 16;
        const __mmask16 km = (__mmask16)((1u << width) - 1);
        for (int64_t g = 0; g < kp / 4; g++) {
            __m128i r[4];
            for (int i = 0; i < 4; i++) {
                const int64_t row = 4 * g + i;
                r[i] = row < k ? _mm_xor_si128(_mm_maskz_loadu_epi8(km, x + row * p + col), flip)
                               : _mm_setzero_si128();
            }
            const __m128i t0 = _mm_unpacklo_epi8(r[0], r[1]), t1 = _mm_unpackhi_epi8(r[0], r[1]);
            const __m128i t2 = _mm_unpacklo_epi8(r[2], r[3]), t3 = _mm_unpackhi_epi8(r[2], r[3]);
            __m128i *out = (__m128i *)(dst + (b * (kp / 4) + g) * 64);
            _mm_storeu_si128(out + 0, _mm_unpacklo_epi16(t0, t2));
            _mm_storeu_si128(out + 1, _mm_unpackhi_epi16(t0, t2));
            _mm_storeu_si128(out + 2, _mm_unpacklo_epi16(t1, t3));
            _mm_storeu_si128(out + 3, _mm_unpackhi_epi16(t1, t3));
        }
    }
}

/* four weight rows times up to four packed column blocks, into acc rows acc_stride apart */
HBC_VNNI static void kernel_4x4(int32_t *restrict acc, int64_t acc_stride,
                                const int32_t *restrict wq, int64_t kq,
                                const uint8_t *restrict xb, int64_t nb,
                                const int32_t *restrict corr) {
    __m512i c[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) c[i][j] = _mm512_setzero_si512();
    for (int64_t g = 0; g < kq; g++) {
        __m512i xv[4];
        for (int j = 0; j < 4; j++)
            xv[j] = j < nb ? _mm512_loadu_si512(xb + (j * kq + g) * 64) : _mm512_setzero_si512();
        for (int i = 0; i < 4; i++) {
            const __m512i wb = _mm512_set1_epi32(wq[i * kq + g]);
            for (int j = 0; j < 4; j++) c[i][j] = _mm512_dpbusd_epi32(c[i][j], xv[j], wb);
        }
    }
    for (int i = 0; i < 4; i++) {
        const __m512i off = _mm512_set1_epi32(corr[i]);
        for (int j = 0; j < nb; j++)
            _mm512_storeu_si512(acc + i * acc_stride + j * 16, _mm512_sub_epi32(c[i][j], off));
    }
}

HBC_VNNI static void gemm_vnni(int32_t *acc, int64_t acc_stride, const int8_t *wq,
                               const int32_t *corr, const int8_t *x, int64_t mp, int64_t k,
                               int64_t p, uint8_t *xpack) {
    const int64_t kp = (k + 3) / 4 * 4, kq = kp / 4, blocks = (p + 15) / 16;
    pack_x(xpack, x, k, p, kp, blocks);
    for (int64_t b = 0; b < blocks; b += 4) {
        const int64_t nb = blocks - b < 4 ? blocks - b : 4;
        for (int64_t r = 0; r < mp; r += 4)
            kernel_4x4(acc + r * acc_stride + b * 16, acc_stride,
                       (const int32_t *)(wq + r * kp), kq, xpack + b * kq * 64, nb, corr + r);
    }
}
