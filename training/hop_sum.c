/* The prefix-weighted hop sum of folded input-cell attention (training/ica.py `gate_inputs`),
 * forward and backward: one pass over time forward, two backward.
 *
 *   u[b,t,k] = sum_j N[b,t,k,j] / D[b,t,j]
 *   N[b,t,k,j] = sum_{s<=t} w[b,s,j] p[b,s,k,j]      D[b,t,j] = sum_{s<=t} w[b,s,j]
 *
 * p is (B, T, G, PH) with PH = R (one projection per hop, the matrix variant) or PH = 1 (shared by
 * every hop, the mean variant); w is (B, T, R); all C-contiguous. Stock torch ops form N as a
 * (B, T, G, R) tensor and pass over it ~20 times forward and backward (the multiply, cumsum and
 * its flip-cumsum-flip backward, the hop matmul and theirs); here it lives in G x R running sums,
 * so the big tensors are read once forward and twice backward.
 *
 * Sums run in the tensors' own dtype. In float32 that is what torch's CUDA cumsum does, and it was
 * measured as accurate as the stock ops in float32 (largest error / largest value, u and both
 * gradients, 1e-7 to 4e-7 at T = 100, 1000 and 5000); summing float32 in double instead cost
 * ~0.5 ms of the ~11 ms forward + input-gradient at batch 32 (tests/test_hop_sum.py). Float32
 * weights past the float32-safe score spread (training/ica.py) come in the online mode below;
 * the float64 instance serves float64 weights.
 *
 * On a machine with AVX-512 the float32 matrix variant (the shipped models' case) takes the
 * vectorised path further down; everything else takes these portable loops.
 *
 * Hops are the innermost axis, taken in blocks of 16 (float32), then 8, 4, one by one: within a block
 * every per-hop quantity is a fixed-length vector the compiler keeps in registers, so each update
 * is a vertical vector operation. (Hop-major order with the gate axis innermost, G = 20, left a
 * scalar remainder loop whose read-modify-write chain through memory took most of the backward;
 * this order measured 1.38x faster backward at batch 32, 1.76x at batch 1, on the shipped shape.)
 *
 * Backward, given gu = dL/du:
 *   Rs[s,k,j] = sum_{t>=s} gu[t,k] / D[t,j]
 *   dL/dp[s,k,j] = w[s,j] Rs[s,k,j]   (PH = 1: summed over j)
 *   dL/dw[s,j]   = sum_k p[s,k,j] Rs[s,k,j] - sum_{t>=s} sum_k gu[t,k] N[t,k,j] / D[t,j]^2
 * With mulw set, gw holds w dL/dw instead: dL/de for weights w = exp(e - a shift that carries no
 * gradient), which saves the caller a pass.
 *
 * Online mode (float32; m given): w holds the raw scores e on entry, and each hop's weights are
 * taken relative to the running maximum of its scores so far, m[t,j] = max_{s<=t} e[s,j], as in an
 * online softmax: w[s,j] = exp(e[s,j] - m[s,j]), and when m rises the sums so far are scaled down
 * by exp(old - new). u is a ratio of sums with one reference, so it is unchanged; every weight is
 * in (0, 1] and every D >= 1 (the step that set the maximum weighs 1), whatever the scores' spread,
 * so no float64 is needed. Forward overwrites w with the weights and writes m; backward reads
 * both, with the suffix sums Rs and q scaled by exp(m[s] - m[s+1]) as they pass a rise, and
 * returns dL/de (mulw set).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

/* exp_f32 (the online mode's weights, tanh below): Cephes' single-precision exp (range reduction
 * by ln 2 in two parts, degree-5 polynomial, scale by 2^n through the exponent bits), relative
 * error ~2e-7, written so that the compiler vectorises it. Arguments are clamped to [-87, 88],
 * where 2^n is a normal float. */
#define EXP_MIN -87.0f
#define EXP_MAX 88.0f
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f      /* ln 2 = EXP_LN2_HI + EXP_LN2_LO, the first part exact */
#define EXP_LN2_LO -2.12194440e-4f
#define EXP_P0 1.9875691500e-4f      /* the polynomial, highest degree first */
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f
INLINE float exp_f32(float x) {
    x = x < EXP_MIN ? EXP_MIN : (x > EXP_MAX ? EXP_MAX : x);
    /* n = round(x / ln 2): adding and subtracting 1.5 * 2^23 rounds to an integer (no floorf, which
     * is a library call unless traps are off, and would keep the loop scalar) */
    const float n = (x * EXP_LOG2E + 12582912.0f) - 12582912.0f;
    float r = x - n * EXP_LN2_HI;
    r = r - n * EXP_LN2_LO;
    float q = EXP_P0;
    q = q * r + EXP_P1;
    q = q * r + EXP_P2;
    q = q * r + EXP_P3;
    q = q * r + EXP_P4;
    q = q * r + EXP_P5;
    const float y = q * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    __builtin_memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

/* Per step: the online mode's bookkeeping, then one block of NB hops at a time (NB = 16, 8, 4 or
 * 1, a compile-time constant after inlining), hops j0..j0+NB-1. The dot products over the gate
 * axis alternate between two accumulators so that the sum over k is two dependency chains. */
#define BLOCKS(SUFFIX, T_)                                                                          \
/* Online mode: where a hop's running maximum rose from mt to the next step's (mt + R), scale its   \
 * G sums (and its per-hop sum: D forward, q backward) by exp(mt - next), between the two steps'    \
 * references: forward from the earlier one down to the later, backward the other way. */           \
INLINE void rescale_##SUFFIX(const T_ *mt, T_ *sums, T_ *hop, int64_t R, int64_t G) {               \
    const T_ *mn = mt + R;                                                                          \
    for (int64_t j = 0; j < R; j++)                                                                 \
        if (mn[j] > mt[j]) {                                                                        \
            const T_ c = exp_f32(mt[j] - mn[j]);                                                    \
            for (int64_t k = 0; k < G; k++) sums[k * R + j] *= c;                                   \
            if (hop) hop[j] *= c;                                                                   \
        }                                                                                           \
}                                                                                                   \
                                                                                                    \
/* Online mode, step t: the running maximum of each hop's scores into mt (from the step before's,  \
 * mt - R), the sums so far scaled down to it where it rose, and the step's scores et replaced by   \
 * their weights exp(e - max so far), all in (0, 1]. */                                             \
INLINE void online_step_##SUFFIX(T_ *et, T_ *mt, int64_t t, T_ *num, T_ *den, int64_t R,            \
                                 int64_t G) {                                                       \
    const T_ *mp = t > 0 ? mt - R : mt;  /* t == 0: the scores themselves (never read) */           \
    _Pragma("omp simd")                                                                             \
    for (int64_t j = 0; j < R; j++) mt[j] = t == 0 || et[j] > mp[j] ? et[j] : mp[j];                \
    if (t > 0) rescale_##SUFFIX(mp, num, den, R, G);                                                \
    _Pragma("omp simd")                                                                             \
    for (int64_t j = 0; j < R; j++) et[j] = exp_f32(et[j] - mt[j]);                                 \
}                                                                                                   \
                                                                                                    \
INLINE void fwd_block_##SUFFIX(const T_ *pt, const T_ *wt, const T_ *inv, T_ *num,                  \
                               T_ *part, int64_t R, int64_t PH, int64_t G, int64_t j0,              \
                               const int NB) {                                                      \
    T_ wv[16], iv[16];                                                                              \
    for (int i = 0; i < NB; i++) { wv[i] = wt[j0 + i]; iv[i] = inv[j0 + i]; }                       \
    for (int64_t k = 0; k < G; k++) {                                                               \
        T_ *nk = num + k * R + j0, *pk_ = part + k * 16;                                            \
        const T_ *pk = pt + (PH == 1 ? k : k * R + j0);                                             \
        _Pragma("omp simd")                                                                         \
        for (int i = 0; i < NB; i++) {                                                              \
            nk[i] += wv[i] * (PH == 1 ? pk[0] : pk[i]);                                             \
            pk_[i] += nk[i] * iv[i];                                                                \
        }                                                                                           \
    }                                                                                               \
}                                                                                                   \
                                                                                                    \
INLINE void bwd1_block_##SUFFIX(const T_ *pt, const T_ *wt, const T_ *gt, const T_ *inv,            \
                                T_ *num, T_ *at, int64_t R, int64_t PH, int64_t G,                  \
                                int64_t j0, const int NB) {                                         \
    T_ wv[16], d0[16], d1[16];                                                                      \
    for (int i = 0; i < NB; i++) { wv[i] = wt[j0 + i]; d0[i] = 0.0; d1[i] = 0.0; }                  \
    for (int64_t k = 0; k < G; k++) {                                                               \
        T_ *nk = num + k * R + j0, *d = (k & 1) ? d1 : d0;                                          \
        const T_ gk = gt[k];                                                                        \
        const T_ *pk = pt + (PH == 1 ? k : k * R + j0);                                             \
        _Pragma("omp simd")                                                                         \
        for (int i = 0; i < NB; i++) {                                                              \
            nk[i] += wv[i] * (PH == 1 ? pk[0] : pk[i]);                                             \
            d[i] += gk * nk[i];                                                                     \
        }                                                                                           \
    }                                                                                               \
    for (int i = 0; i < NB; i++) at[j0 + i] = (d0[i] + d1[i]) * inv[j0 + i] * inv[j0 + i];          \
}                                                                                                   \
                                                                                                    \
INLINE void bwd2_block_##SUFFIX(const T_ *pt, const T_ *wt, const T_ *gt, const T_ *inv,            \
                                const T_ *at, T_ *rs, T_ *q, T_ *gsum, T_ *gpt,                     \
                                T_ *gwt, int64_t R, int64_t PH, int64_t G, int64_t j0, int mulw,    \
                                const int NB) {                                                     \
    T_ wv[16], iv[16], d0[16], d1[16];                                                              \
    for (int i = 0; i < NB; i++) {                                                                  \
        wv[i] = wt[j0 + i]; iv[i] = inv[j0 + i]; d0[i] = 0.0; d1[i] = 0.0;                          \
        q[j0 + i] += at[j0 + i];                                                                    \
    }                                                                                               \
    for (int64_t k = 0; k < G; k++) {                                                               \
        T_ *rk = rs + k * R + j0, *d = (k & 1) ? d1 : d0;                                           \
        const T_ gk = gt[k];                                                                        \
        if (PH == 1) {                                                                              \
            const T_ pk = pt[k];                                                                    \
            T_ s = 0.0;                                                                             \
            _Pragma("omp simd reduction(+:s)")                                                      \
            for (int i = 0; i < NB; i++) {                                                          \
                rk[i] += gk * iv[i];                                                                \
                s += wv[i] * rk[i];                                                                 \
                d[i] += pk * rk[i];                                                                 \
            }                                                                                       \
            gsum[k] += s;                                                                           \
        } else {                                                                                    \
            const T_ *pk = pt + k * R + j0;                                                         \
            T_ *gpk = gpt + k * R + j0;                                                             \
            _Pragma("omp simd")                                                                     \
            for (int i = 0; i < NB; i++) {                                                          \
                rk[i] += gk * iv[i];                                                                \
                gpk[i] = wv[i] * rk[i];                                                             \
                d[i] += pk[i] * rk[i];                                                              \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
    for (int i = 0; i < NB; i++) gwt[j0 + i] = (d0[i] + d1[i] - q[j0 + i]) * (mulw ? wv[i] : 1);   \
}

/* Hops in blocks of 16 (a float32 vector register; `num` has the sums' type), then 8, then one
 * of 4, then one by one. */
#define EACH_BLOCK(CALL)                                                                            \
    {                                                                                               \
        int64_t j0 = 0;                                                                             \
        if (sizeof(*num) == 4) for (; j0 + 16 <= R; j0 += 16) CALL(16);                             \
        for (; j0 + 8 <= R; j0 += 8) CALL(8);                                                       \
        if (j0 + 4 <= R) { CALL(4); j0 += 4; }                                                      \
        for (; j0 < R; j0++) CALL(1);                                                               \
    }

/* ---- The matrix variant in float32 on AVX-512 ----------------------------------------------
 * Same sums, same order of operations per hop and step, laid out for 16-lane vectors: hops in
 * vectors (the last one masked), each gate's running sums in a row padded to whole vectors and
 * aligned, and the per-hop quantities taken first, in a pass of their own:
 *  - forward, per sequence: the running maxima, the factors c[t] = exp(m[t-1] - m[t]) by which
 *    the sums shrink where a maximum rose (1 elsewhere, exactly), the weights, their prefix sums
 *    D and 1 / D. Only D chains from step to step there, so steps overlap; the rows then take one
 *    multiply by c at the steps where a maximum rose, instead of a branch per hop and step;
 *  - u[t] = sum_j N[t,:,j] / D[t,j] for 16 gates at once, by a tree of shuffles and adds, instead
 *    of a horizontal sum per gate.
 * Measured against the portable loops above at the shipped shape (G = R = 20, T = 100, one core):
 * forward 479 -> 265 us and backward 738 -> 473 us per 32 sequences. Results agree to float32
 * rounding (tests/test_hop_sum.py compares both paths). */
#if defined(__AVX512F__)
#include <immintrin.h>

static int vectorised = 1;  /* icaserve_hop_sum_vectorised(0) runs the portable loops instead */

/* exp_f32 on 16 lanes: the same steps and constants, with the scale by 2^n done by scalef. */
static inline __m512 exp_v16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_MIN)), _mm512_set1_ps(EXP_MAX));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
    __m512 q = _mm512_set1_ps(EXP_P0);
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(EXP_P1));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(EXP_P2));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(EXP_P3));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(EXP_P4));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(EXP_P5));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(q, r), r, r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

/* The lanes of a block of 16 that hold one of `n` items starting at the block (all when n >= 16). */
static inline __mmask16 lanes(int64_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

/* 64-byte aligned scratch; the size rounded up to whole vectors (and at least one). */
static void *alloc_v16(size_t bytes) {
    return aligned_alloc(64, bytes ? (bytes + 63) / 64 * 64 : 64);
}

/* Sixteen vectors -> the vector of their sums (lane i = the sum of v[i]'s lanes): 15 adds and 30
 * shuffles instead of 16 horizontal sums. */
static inline __m512 sums16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane, interleaved partial sums of v[2i], v[2i+1] */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* per 128-bit lane, the sums of v[4i..4i+3] there */
        const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)  /* then across the 128-bit lanes, pairwise */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* The factor by which running sums referred to the maxima `prev` shrink when the maxima become
 * `next` (>= prev): exp(prev - next), exactly 1 where no lane rose; sets *rose where one did.
 * The forward's per-hop pass and the backward's factors share it, so both give the same values. */
static inline __m512 rise_v16(__m512 prev, __m512 next, char *rose) {
    if (!_mm512_cmp_ps_mask(next, prev, _CMP_GT_OQ)) return _mm512_set1_ps(1.0f);
    *rose = 1;
    return exp_v16(_mm512_sub_ps(prev, next));
}

/* Forward, one sequence's per-hop pass (see above): m and w (online mode, w holding the scores on
 * entry), the factors c into cb (rp per step) with cf[t] set where any is not 1, and 1 / D. */
static void hops_v16(float *w, float *inv, float *m, float *cb, char *cf, int64_t T, int64_t R, int64_t rp) {
    for (int64_t j0 = 0; j0 < R; j0 += 16) {
        const __mmask16 k = lanes(R - j0);
        __m512 den = _mm512_setzero_ps(), mx = _mm512_setzero_ps();
        for (int64_t t = 0; t < T; t++) {
            float *wt = w + t * R + j0;
            __m512 e = _mm512_maskz_loadu_ps(k, wt);
            if (m) {
                const __m512 next = t ? _mm512_max_ps(mx, e) : e;
                const __m512 c = t ? rise_v16(mx, next, cf + t) : _mm512_set1_ps(1.0f);
                mx = next;
                _mm512_store_ps(cb + t * rp + j0, c);
                _mm512_mask_storeu_ps(m + t * R + j0, k, mx);
                e = _mm512_maskz_mov_ps(k, exp_v16(_mm512_sub_ps(e, mx)));
                _mm512_mask_storeu_ps(wt, k, e);
                den = _mm512_fmadd_ps(den, c, e);
            } else {
                den = _mm512_add_ps(den, e);
            }
            _mm512_mask_storeu_ps(inv + t * R + j0, k, _mm512_maskz_div_ps(k, _mm512_set1_ps(1.0f), den));
        }
    }
}

/* Forward, step t's rows: N[t,g,:] = c N[t-1,g,:] + w[t] p[t,g,:] (c only where ct is given), and
 * u[t,g] = N[t,g,:] . (1 / D[t]), 16 gates at a time. nb (hop blocks) is a constant after
 * inlining for the common widths, so the step's vectors stay in registers. */
static inline __attribute__((always_inline)) void rows_v16(const float *pt, float *num, const float *wt,
        const float *it, const float *ct, float *ut, int64_t R, int64_t rp, int64_t G, const int64_t nb) {
    __m512 W[4], I[4], C[4] = {_mm512_set1_ps(1.0f), _mm512_set1_ps(1.0f), _mm512_set1_ps(1.0f), _mm512_set1_ps(1.0f)};
    const int held = nb <= 4;
    for (int64_t jb = 0; held && jb < nb; jb++) {
        W[jb] = _mm512_maskz_loadu_ps(lanes(R - jb * 16), wt + jb * 16);
        I[jb] = _mm512_maskz_loadu_ps(lanes(R - jb * 16), it + jb * 16);
        if (ct) C[jb] = _mm512_load_ps(ct + jb * 16);
    }
    for (int64_t g0 = 0; g0 < G; g0 += 16) {
        __m512 s[16];
        for (int i = 0; i < 16; i++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t jb = 0; g0 + i < G && jb < nb; jb++) {
                const __mmask16 k = lanes(R - jb * 16);
                float *row = num + (g0 + i) * rp + jb * 16;
                __m512 n = _mm512_load_ps(row);
                if (ct) n = _mm512_mul_ps(n, held ? C[jb] : _mm512_load_ps(ct + jb * 16));
                n = _mm512_fmadd_ps(held ? W[jb] : _mm512_maskz_loadu_ps(k, wt + jb * 16),
                                    _mm512_maskz_loadu_ps(k, pt + (g0 + i) * R + jb * 16), n);
                _mm512_store_ps(row, n);
                acc = _mm512_fmadd_ps(n, held ? I[jb] : _mm512_maskz_loadu_ps(k, it + jb * 16), acc);
            }
            s[i] = acc;
        }
        _mm512_mask_storeu_ps(ut + g0, lanes(G - g0), sums16(s));
    }
}

/* Forward, one sequence (p, w, u, inv_den, m at its start), with the caller's scratch: num (G x rp),
 * cb (T x rp), cf (T + 1). */
static void forward_seq_v16(const float *p, float *w, float *u, float *inv_den, float *m, float *num, float *cb,
                            char *cf, int64_t T, int64_t R, int64_t G) {
    const int64_t nb = (R + 15) / 16, rp = nb * 16;
    memset(num, 0, sizeof(float) * G * rp);
    memset(cf, 0, T);
    hops_v16(w, inv_den, m, cb, cf, T, R, rp);
    for (int64_t t = 0; t < T; t++) {
        const float *ct = cf[t] ? cb + t * rp : NULL;
#define ROWS_V16(NB) rows_v16(p + t * G * R, num, w + t * R, inv_den + t * R, ct, u + t * G, R, rp, G, NB)
        if (nb == 1) ROWS_V16(1); else if (nb == 2) ROWS_V16(2); else ROWS_V16(nb);
#undef ROWS_V16
    }
}

/* The forward's scratch: num (G x rp floats), cb (T x rp), cf (T + 1 chars); 1 when out of memory. */
static int forward_scratch_v16(float **num, float **cb, char **cf, int64_t T, int64_t R, int64_t G) {
    const int64_t rp = (R + 15) / 16 * 16;
    *num = alloc_v16(sizeof(float) * G * rp);
    *cb = alloc_v16(sizeof(float) * T * rp);
    *cf = malloc(T + 1);
    if (*num && *cb && *cf) return 0;
    free(*num); free(*cb); free(*cf);
    return 1;
}

static int forward_v16(const float *p, float *w, float *u, float *inv_den, float *m, int64_t B, int64_t T,
                       int64_t R, int64_t G) {
    float *num, *cb;
    char *cf;
    if (forward_scratch_v16(&num, &cb, &cf, T, R, G)) return 1;
    for (int64_t b = 0; b < B; b++) {
        const int64_t s0 = b * T;
        forward_seq_v16(p + s0 * G * R, w + s0 * R, u + s0 * G, inv_den + s0 * R, m ? m + s0 * R : NULL, num, cb,
                        cf, T, R, G);
    }
    free(num); free(cb); free(cf);
    return 0;
}

/* Backward: the factors c[t] again, from the running maxima the forward wrote (the same values). */
static void factors_v16(const float *m, float *cb, char *cf, int64_t T, int64_t R, int64_t rp) {
    memset(cf, 0, T);
    for (int64_t t = 1; t < T; t++)
        for (int64_t j0 = 0; j0 < R; j0 += 16) {
            const __mmask16 k = lanes(R - j0);
            const __m512 a = _mm512_maskz_loadu_ps(k, m + (t - 1) * R + j0), b = _mm512_maskz_loadu_ps(k, m + t * R + j0);
            _mm512_store_ps(cb + t * rp + j0, rise_v16(a, b, cf + t));
        }
}

/* Backward, forward in time, step t: the sums N rebuilt, and a[t] = (sum_g gu[t,g] N[t,g,:]) / D[t]^2,
 * gates in two chains. */
static inline __attribute__((always_inline)) void bwd_rows1_v16(const float *pt, float *num, const float *wt,
        const float *it, const float *ct, const float *gt, float *at, int64_t R, int64_t rp, int64_t G,
        const int64_t nb) {
    for (int64_t jb = 0; jb < nb; jb++) {
        const __mmask16 k = lanes(R - jb * 16);
        const __m512 W = _mm512_maskz_loadu_ps(k, wt + jb * 16), C = ct ? _mm512_load_ps(ct + jb * 16) : W;
        __m512 d0 = _mm512_setzero_ps(), d1 = _mm512_setzero_ps();
        int64_t g = 0;
        for (; g + 1 < G; g += 2) {  /* two rows at a time, one chain each, in registers */
            float *r0 = num + g * rp + jb * 16, *r1 = r0 + rp;
            __m512 n0 = _mm512_load_ps(r0), n1 = _mm512_load_ps(r1);
            if (ct) { n0 = _mm512_mul_ps(n0, C); n1 = _mm512_mul_ps(n1, C); }
            n0 = _mm512_fmadd_ps(W, _mm512_maskz_loadu_ps(k, pt + g * R + jb * 16), n0);
            n1 = _mm512_fmadd_ps(W, _mm512_maskz_loadu_ps(k, pt + (g + 1) * R + jb * 16), n1);
            _mm512_store_ps(r0, n0);
            _mm512_store_ps(r1, n1);
            d0 = _mm512_fmadd_ps(_mm512_set1_ps(gt[g]), n0, d0);
            d1 = _mm512_fmadd_ps(_mm512_set1_ps(gt[g + 1]), n1, d1);
        }
        if (g < G) {
            float *r0 = num + g * rp + jb * 16;
            __m512 n0 = _mm512_load_ps(r0);
            if (ct) n0 = _mm512_mul_ps(n0, C);
            n0 = _mm512_fmadd_ps(W, _mm512_maskz_loadu_ps(k, pt + g * R + jb * 16), n0);
            _mm512_store_ps(r0, n0);
            d0 = _mm512_fmadd_ps(_mm512_set1_ps(gt[g]), n0, d0);
        }
        const __m512 I = _mm512_maskz_loadu_ps(k, it + jb * 16);
        _mm512_mask_storeu_ps(at + jb * 16, k, _mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(d0, d1), I), I));
    }
}

/* Backward, backward in time, step t: the suffix sums Rs (rows) and q, first scaled from step t + 1's
 * reference to step t's by ct; then dL/dp[t] = w[t] Rs and dL/dw[t] (times w with mulw). */
static inline __attribute__((always_inline)) void bwd_rows2_v16(const float *pt, float *rs, float *q,
        const float *wt, const float *it, const float *ct, const float *gt, const float *at, float *gpt,
        float *gwt, int mulw, int64_t R, int64_t rp, int64_t G, const int64_t nb) {
    for (int64_t jb = 0; jb < nb; jb++) {
        const __mmask16 k = lanes(R - jb * 16);
        const __m512 W = _mm512_maskz_loadu_ps(k, wt + jb * 16), I = _mm512_maskz_loadu_ps(k, it + jb * 16);
        const __m512 C = ct ? _mm512_load_ps(ct + jb * 16) : W;
        __m512 qv = _mm512_load_ps(q + jb * 16);
        if (ct) qv = _mm512_mul_ps(qv, C);
        qv = _mm512_add_ps(qv, _mm512_maskz_loadu_ps(k, at + jb * 16));
        _mm512_store_ps(q + jb * 16, qv);
        __m512 d0 = _mm512_setzero_ps(), d1 = _mm512_setzero_ps();
        int64_t g = 0;
        for (; g + 1 < G; g += 2) {
            float *r0 = rs + g * rp + jb * 16, *r1 = r0 + rp;
            __m512 x0 = _mm512_load_ps(r0), x1 = _mm512_load_ps(r1);
            if (ct) { x0 = _mm512_mul_ps(x0, C); x1 = _mm512_mul_ps(x1, C); }
            x0 = _mm512_fmadd_ps(_mm512_set1_ps(gt[g]), I, x0);
            x1 = _mm512_fmadd_ps(_mm512_set1_ps(gt[g + 1]), I, x1);
            _mm512_store_ps(r0, x0);
            _mm512_store_ps(r1, x1);
            _mm512_mask_storeu_ps(gpt + g * R + jb * 16, k, _mm512_mul_ps(W, x0));
            _mm512_mask_storeu_ps(gpt + (g + 1) * R + jb * 16, k, _mm512_mul_ps(W, x1));
            d0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, pt + g * R + jb * 16), x0, d0);
            d1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, pt + (g + 1) * R + jb * 16), x1, d1);
        }
        if (g < G) {
            float *r0 = rs + g * rp + jb * 16;
            __m512 x0 = _mm512_load_ps(r0);
            if (ct) x0 = _mm512_mul_ps(x0, C);
            x0 = _mm512_fmadd_ps(_mm512_set1_ps(gt[g]), I, x0);
            _mm512_store_ps(r0, x0);
            _mm512_mask_storeu_ps(gpt + g * R + jb * 16, k, _mm512_mul_ps(W, x0));
            d0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, pt + g * R + jb * 16), x0, d0);
        }
        __m512 gw = _mm512_sub_ps(_mm512_add_ps(d0, d1), qv);
        _mm512_mask_storeu_ps(gwt + jb * 16, k, mulw ? _mm512_mul_ps(gw, W) : gw);
    }
}

/* The backward's scratch, per sequence: num and rs (G x rp floats), q (rp), cb (T x rp), a (T x R),
 * cf (T + 1 chars). */
typedef struct {
    float *num, *rs, *q, *cb, *a;
    char *cf;
} bwd_scratch_v16;

static void free_bwd_scratch_v16(bwd_scratch_v16 *s) {
    free(s->num); free(s->rs); free(s->q); free(s->cb); free(s->a); free(s->cf);
}

static int bwd_scratch_alloc_v16(bwd_scratch_v16 *s, int64_t T, int64_t R, int64_t G) {
    const int64_t rp = (R + 15) / 16 * 16;
    s->num = alloc_v16(sizeof(float) * G * rp);
    s->rs = alloc_v16(sizeof(float) * G * rp);
    s->q = alloc_v16(sizeof(float) * rp);
    s->cb = alloc_v16(sizeof(float) * T * rp);
    s->a = malloc(sizeof(float) * (T * R + 1));
    s->cf = calloc(T + 1, 1);
    if (s->num && s->rs && s->q && s->cb && s->a && s->cf) return 0;
    free_bwd_scratch_v16(s);
    return 1;
}

/* Backward, one sequence (every pointer at its start). */
static void backward_seq_v16(const float *p, const float *w, const float *inv_den, const float *gu, float *gp,
                             float *gw, int mulw, const float *m, const bwd_scratch_v16 *sc, int64_t T, int64_t R,
                             int64_t G) {
    const int64_t nb = (R + 15) / 16, rp = nb * 16;
    float *num = sc->num, *rs = sc->rs, *q = sc->q, *cb = sc->cb, *a = sc->a;
    char *cf = sc->cf;
    if (m) factors_v16(m, cb, cf, T, R, rp);
    memset(num, 0, sizeof(float) * G * rp);
    for (int64_t t = 0; t < T; t++) {
        const float *ct = cf[t] ? cb + t * rp : NULL;
#define ROWS1_V16(NB) bwd_rows1_v16(p + t * G * R, num, w + t * R, inv_den + t * R, ct, gu + t * G, a + t * R, \
                                    R, rp, G, NB)
        if (nb == 1) ROWS1_V16(1); else if (nb == 2) ROWS1_V16(2); else ROWS1_V16(nb);
#undef ROWS1_V16
    }
    memset(rs, 0, sizeof(float) * G * rp);
    memset(q, 0, sizeof(float) * rp);
    for (int64_t t = T - 1; t >= 0; t--) {
        const float *ct = t < T - 1 && cf[t + 1] ? cb + (t + 1) * rp : NULL;
#define ROWS2_V16(NB) bwd_rows2_v16(p + t * G * R, rs, q, w + t * R, inv_den + t * R, ct, gu + t * G, a + t * R, \
                                    gp + t * G * R, gw + t * R, mulw, R, rp, G, NB)
        if (nb == 1) ROWS2_V16(1); else if (nb == 2) ROWS2_V16(2); else ROWS2_V16(nb);
#undef ROWS2_V16
    }
}

static int backward_v16(const float *p, const float *w, const float *inv_den, const float *gu, float *gp,
                        float *gw, int mulw, const float *m, int64_t B, int64_t T, int64_t R, int64_t G) {
    bwd_scratch_v16 sc;
    if (bwd_scratch_alloc_v16(&sc, T, R, G)) return 1;
    for (int64_t b = 0; b < B; b++) {
        const int64_t s0 = b * T;
        backward_seq_v16(p + s0 * G * R, w + s0 * R, inv_den + s0 * R, gu + s0 * G, gp + s0 * G * R, gw + s0 * R,
                         mulw, m ? m + s0 * R : NULL, &sc, T, R, G);
    }
    free_bwd_scratch_v16(&sc);
    return 0;
}

/* ---- FoldedICA whole, one sequence at a time (float32 matrix variant, AVX-512) ----------------
 * icaserve_ica_forward_f32 and icaserve_ica_backward_f32 run training/hop_sum.py `FoldedICA` in one
 * call: per sequence, forward the scores e = W2 tanh(W1 x), the projection p = x rows^T and the hop
 * sum; backward the hop sum's passes, the score path's gradient and dL/dx = dL/dp rows + dL/da W1.
 * A sequence's p (160 KB at the shipped shape) goes from the GEMM to the hop sum, and its gradient
 * from the hop sum to the GEMM, within the core's L2 cache; in torch calls the batch's 5 MB p went
 * through memory, and MKL's sgemm (its AVX2 code on this CPU) first zero-fills its output in a pass
 * of its own. The GEMMs are register tiles of up to 6 rows x 4 vectors of 16 columns over weights
 * packed once into 64-column panels (icaserve_gemm_pack_f32, cached by the caller). Measured at the
 * shipped shape, one core: the projection's forward 53 GMAC/s against MKL's 45, its input-gradient
 * (with W1's) 44 against 38. */
#define PANEL 64
#define MR_MAX 6

int icaserve_tanh_f32(float *a, int64_t n);
int icaserve_tanh_backward_f32(float *g, const float *h, int64_t n);

/* B (K x Nc), element (k, c) at b[k * sk + c * sc], into panels of PANEL columns (the last one
 * narrower), each k-major with its rows padded to whole vectors with zeros: K x roundup16(Nc)
 * floats in all, panel c0 / PANEL at out + c0 * K. */
int icaserve_gemm_pack_f32(const float *b, int64_t sk, int64_t sc, int64_t K, int64_t Nc, float *out) {
    for (int64_t c0 = 0; c0 < Nc; c0 += PANEL) {
        const int64_t w = Nc - c0 < PANEL ? Nc - c0 : PANEL, nr = (w + 15) / 16 * 16;
        float *panel = out + c0 * K;
        for (int64_t k = 0; k < K; k++)
            for (int64_t i = 0; i < nr; i++) panel[k * nr + i] = i < w ? b[k * sk + (c0 + i) * sc] : 0.0f;
    }
    return 0;
}

/* One register tile: C[MR x w] = A1[MR x K1] B1 + A2[MR x K2] B2 over one panel (nr columns, w of
 * them kept). MR and NV (= nr / 16) are constants after inlining, so the MR x NV accumulators stay in
 * registers; each k broadcasts one A value per row against NV vectors of B. */
static inline __attribute__((always_inline)) void tile_v16(const float *a1, int64_t lda1, int64_t K1,
        const float *b1, const float *a2, int64_t lda2, int64_t K2, const float *b2, int64_t nr, float *c,
        int64_t ldc, int64_t w, int add, const int MR, const int NV) {
    __m512 acc[MR_MAX][4];
#pragma GCC unroll 6
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++)
            acc[r][v] = add ? _mm512_maskz_loadu_ps(lanes(w - 16 * v), c + r * ldc + 16 * v) : _mm512_setzero_ps();
    for (int seg = 0; seg < 2; seg++) {
        const float *a = seg ? a2 : a1, *bp = seg ? b2 : b1;
        const int64_t lda = seg ? lda2 : lda1, K = seg ? K2 : K1;
        for (int64_t k = 0; k < K; k++) {
            __m512 b[4];
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) b[v] = _mm512_loadu_ps(bp + k * nr + 16 * v);
#pragma GCC unroll 6
            for (int r = 0; r < MR; r++) {
                const __m512 av = _mm512_set1_ps(a[r * lda + k]);
#pragma GCC unroll 4
                for (int v = 0; v < NV; v++) acc[r][v] = _mm512_fmadd_ps(av, b[v], acc[r][v]);
            }
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) _mm512_mask_storeu_ps(c + r * ldc + 16 * v, lanes(w - 16 * v), acc[r][v]);
}

/* C (M x Nc, row stride ldc) = A1 (M x K1) B1 + A2 (M x K2) B2 (K2 = 0: no second term), plus C
 * itself where `add` is set; B1 and B2 packed by icaserve_gemm_pack_f32 with this Nc. Panel by panel
 * (one panel of B1 is 25 KB at K1 = 100: it stays in L1 while the rows pass), MR_MAX rows at a time. */
static void gemm_v16(const float *a1, int64_t lda1, int64_t K1, const float *b1, const float *a2, int64_t lda2,
                     int64_t K2, const float *b2, int64_t M, int64_t Nc, float *c, int64_t ldc, int add) {
    for (int64_t c0 = 0; c0 < Nc; c0 += PANEL) {
        const int64_t w = Nc - c0 < PANEL ? Nc - c0 : PANEL, nr = (w + 15) / 16 * 16;
        const float *p1 = b1 + c0 * K1, *p2 = K2 ? b2 + c0 * K2 : b1;
        for (int64_t r0 = 0; r0 < M; r0 += MR_MAX) {
            const int64_t mr = M - r0 < MR_MAX ? M - r0 : MR_MAX;
            const float *x1 = a1 + r0 * lda1, *x2 = K2 ? a2 + r0 * lda2 : a1;
            float *cc = c + r0 * ldc + c0;
#define TILE_V16(MR, NV) tile_v16(x1, lda1, K1, p1, x2, lda2, K2, p2, nr, cc, ldc, w, add, MR, NV)
#define WIDTHS_V16(MR) switch (nr / 16) { case 1: TILE_V16(MR, 1); break; case 2: TILE_V16(MR, 2); break; \
                                          case 3: TILE_V16(MR, 3); break; default: TILE_V16(MR, 4); }
            switch (mr) {
                case 1: WIDTHS_V16(1); break;
                case 2: WIDTHS_V16(2); break;
                case 3: WIDTHS_V16(3); break;
                case 4: WIDTHS_V16(4); break;
                case 5: WIDTHS_V16(5); break;
                default: WIDTHS_V16(6);
            }
#undef WIDTHS_V16
#undef TILE_V16
        }
    }
}

/* C (M x Nc, row stride ldc) = A (M x K, row stride lda) B, B packed by icaserve_gemm_pack_f32:
 * the GEMM alone (benchmarks/bench_ica.py times it as the floor's GEMM). */
int icaserve_gemm_f32(const float *a, int64_t lda, int64_t K, const float *b, int64_t M, int64_t Nc, float *c,
                      int64_t ldc) {
    gemm_v16(a, lda, K, b, NULL, 0, 0, NULL, M, Nc, c, ldc, 0);
    return 0;
}

/* The attention's scores for one sequence: h = tanh(x W1^T) (T x DA), e = h W2^T (T x R), with W1^T
 * and W2^T packed. */
static void scores_seq_v16(const float *x, const float *w1t, const float *w2t, float *h, float *e, int64_t T,
                           int64_t N, int64_t DA, int64_t R) {
    gemm_v16(x, N, N, w1t, NULL, 0, 0, NULL, T, DA, h, DA, 0);
    icaserve_tanh_f32(h, T * DA);
    gemm_v16(h, DA, DA, w2t, NULL, 0, 0, NULL, T, R, e, R, 0);
}

/* The scores' gradient back through W2 and tanh for one sequence: da = (ge W2) * (1 - h^2), the
 * gradient of W1 x (T x DA), with W2 packed. */
static void scores_grad_seq_v16(const float *ge, const float *w2, const float *h, float *da, int64_t T,
                                int64_t DA, int64_t R) {
    gemm_v16(ge, R, R, w2, NULL, 0, 0, NULL, T, DA, da, DA, 0);  /* dL/dh */
    icaserve_tanh_backward_f32(da, h, T * DA);
}

/* Forward. In: x (B, T, N); packed w1t (K = N, Nc = DA: W1^T), w2t (DA, R: W2^T), rowst (N, G*R:
 * rows^T). Out: h = tanh(x W1^T) (B, T, DA), w the weights (B, T, R), m their running maxima, inv_den,
 * p (B, T, G, R) and u (B, T, G), as `_gates_forward` in the online mode. */
int icaserve_ica_forward_f32(const float *x, const float *w1t, const float *w2t, const float *rowst, float *h,
                             float *w, float *m, float *inv_den, float *p, float *u, int64_t B, int64_t T,
                             int64_t N, int64_t DA, int64_t R, int64_t G) {
    float *num, *cb;
    char *cf;
    if (forward_scratch_v16(&num, &cb, &cf, T, R, G)) return 1;
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * T * N;
        float *hb = h + b * T * DA, *wb = w + b * T * R, *pb = p + b * T * G * R;
        scores_seq_v16(xb, w1t, w2t, hb, wb, T, N, DA, R);
        gemm_v16(xb, N, N, rowst, NULL, 0, 0, NULL, T, G * R, pb, G * R, 0);
        forward_seq_v16(pb, wb, u + b * T * G, inv_den + b * T * R, m + b * T * R, num, cb, cf, T, R, G);
    }
    free(num); free(cb); free(cf);
    return 0;
}

/* Backward to x alone. In: forward's h, w, m, inv_den, p; gu = dL/du (B, T, G); packed w1 (DA, N),
 * w2 (R, DA), rows (G*R, N). Out: gx = dL/dx (B, T, N). */
int icaserve_ica_backward_f32(const float *h, const float *w, const float *m, const float *inv_den,
                              const float *p, const float *gu, const float *w1, const float *w2, const float *rows,
                              float *gx, int64_t B, int64_t T, int64_t N, int64_t DA, int64_t R, int64_t G) {
    bwd_scratch_v16 sc;
    if (bwd_scratch_alloc_v16(&sc, T, R, G)) return 1;
    float *gp = alloc_v16(sizeof(float) * T * G * R), *ge = alloc_v16(sizeof(float) * T * R);
    float *da = alloc_v16(sizeof(float) * T * DA);
    if (!gp || !ge || !da) { free(gp); free(ge); free(da); free_bwd_scratch_v16(&sc); return 1; }
    for (int64_t b = 0; b < B; b++) {
        const int64_t s0 = b * T;
        backward_seq_v16(p + s0 * G * R, w + s0 * R, inv_den + s0 * R, gu + s0 * G, gp, ge, 1, m + s0 * R, &sc,
                         T, R, G);
        scores_grad_seq_v16(ge, w2, h + s0 * DA, da, T, DA, R);
        gemm_v16(gp, G * R, G * R, rows, da, DA, DA, w1, T, N, gx + s0 * N, N, 0);
    }
    free(gp); free(ge); free(da); free_bwd_scratch_v16(&sc);
    return 0;
}

/* ---- Projected ICA whole, one sequence at a time (G >= N: hidden 64 at the paper's shape) -----
 * Where the gate width G is at least N, the cheaper order forms the cell inputs first, the per-hop
 * prefix means M[t, j, :] = (sum_{s<=t} w[s,j] x[s]) / D[t,j] (r x N per step), and multiplies them
 * by W_ih once (training/ica.py `gate_inputs`). On stock ops the (B, T, r, N) tensors (26 MB at batch
 * 32) went through memory a dozen times forward and backward. Here, per sequence: the scores and
 * weights as in FoldedICA (same online softmax, hops_v16), the means in running sums per hop (r x N
 * floats, in L1) written to one sequence's scratch (800 KB at the shipped shape, in L2) and one GEMM
 * with W_ih (K = r N). Backward recomputes the means from x rather than keeping them:
 *   dM = du W_ih;  Rs[s,j] = sum_{t>=s} dM[t,j] / D[t,j];  dL/dx[s] = sum_j w[s,j] Rs[s,j];
 *   dL/dw[s,j] = x[s] . Rs[s,j] - sum_{t>=s} (dM[t,j] . M[t,j]) / D[t,j]
 * the hop sum's backward with the roles of the two operands swapped (x shared by every hop, dM
 * per hop), then the score path's input-gradient added by the GEMM with W1. */

/* One step's means: S[j] = c S[j] + w[j] x (c where ct is given), M[j] = S[j] / D[j]; S rows padded
 * to np floats (nv vectors, the last one masked to N). */
static inline __attribute__((always_inline)) void means_step_v16(const float *xt, float *S, const float *wt,
        const float *it, const float *ct, float *mt, int64_t R, int64_t N, int64_t np) {
    const int64_t nv = np / 16;
    for (int64_t j = 0; j < R; j++) {
        const __m512 W = _mm512_set1_ps(wt[j]), I = _mm512_set1_ps(it[j]);
        const __m512 C = _mm512_set1_ps(ct ? ct[j] : 1.0f);
        float *row = S + j * np;
        for (int64_t v = 0; v < nv; v++) {
            const __mmask16 k = lanes(N - 16 * v);
            __m512 sv = _mm512_load_ps(row + 16 * v);
            if (ct) sv = _mm512_mul_ps(sv, C);
            sv = _mm512_fmadd_ps(W, _mm512_maskz_loadu_ps(k, xt + 16 * v), sv);
            _mm512_store_ps(row + 16 * v, sv);
            if (mt) _mm512_mask_storeu_ps(mt + j * N + 16 * v, k, _mm512_mul_ps(sv, I));
        }
    }
}

/* Forward. In: x (B, T, N); packed w1t (N, DA), w2t (DA, R) and wiht (R*N, G: W_ih^T). Out: h, w, m,
 * inv_den as icaserve_ica_forward_f32's, and u = the gate inputs (B, T, G). */
int icaserve_ica_projected_forward_f32(const float *x, const float *w1t, const float *w2t, const float *wiht,
                                       float *h, float *w, float *m, float *inv_den, float *u, int64_t B,
                                       int64_t T, int64_t N, int64_t DA, int64_t R, int64_t G) {
    const int64_t rp = (R + 15) / 16 * 16, np = (N + 15) / 16 * 16;
    float *S = alloc_v16(sizeof(float) * R * np), *M = alloc_v16(sizeof(float) * T * R * N);
    float *cb = alloc_v16(sizeof(float) * T * rp);
    char *cf = malloc(T + 1);
    if (!S || !M || !cb || !cf) { free(S); free(M); free(cb); free(cf); return 1; }
    for (int64_t b = 0; b < B; b++) {
        const int64_t s0 = b * T;
        const float *xb = x + s0 * N;
        float *wb = w + s0 * R, *ib = inv_den + s0 * R;
        scores_seq_v16(xb, w1t, w2t, h + s0 * DA, wb, T, N, DA, R);
        memset(cf, 0, T);
        hops_v16(wb, ib, m + s0 * R, cb, cf, T, R, rp);
        memset(S, 0, sizeof(float) * R * np);
        for (int64_t t = 0; t < T; t++)
            means_step_v16(xb + t * N, S, wb + t * R, ib + t * R, cf[t] ? cb + t * rp : NULL, M + t * R * N, R, N, np);
        gemm_v16(M, R * N, R * N, wiht, NULL, 0, 0, NULL, T, G, u + s0 * G, G, 0);
    }
    free(S); free(M); free(cb); free(cf);
    return 0;
}

/* Backward to x alone. In: x and forward's h, w, m, inv_den; gu = dL/du (B, T, G); packed w1 (DA, N),
 * w2 (R, DA) and wih (G, R*N: W_ih). Out: gx = dL/dx (B, T, N). */
int icaserve_ica_projected_backward_f32(const float *x, const float *h, const float *w, const float *m,
                                        const float *inv_den, const float *gu, const float *w1, const float *w2,
                                        const float *wih, float *gx, int64_t B, int64_t T, int64_t N, int64_t DA,
                                        int64_t R, int64_t G) {
    const int64_t rp = (R + 15) / 16 * 16, np = (N + 15) / 16 * 16, nv = np / 16;
    float *S = alloc_v16(sizeof(float) * R * np), *Rs = alloc_v16(sizeof(float) * R * np);
    float *dM = alloc_v16(sizeof(float) * T * R * N), *cb = alloc_v16(sizeof(float) * T * rp);
    float *a = alloc_v16(sizeof(float) * T * R), *q = alloc_v16(sizeof(float) * R);
    float *ge = alloc_v16(sizeof(float) * T * R), *da = alloc_v16(sizeof(float) * T * DA);
    char *cf = calloc(T + 1, 1);
    if (!S || !Rs || !dM || !cb || !a || !q || !ge || !da || !cf) {
        free(S); free(Rs); free(dM); free(cb); free(a); free(q); free(ge); free(da); free(cf);
        return 1;
    }
    for (int64_t b = 0; b < B; b++) {
        const int64_t s0 = b * T;
        const float *xb = x + s0 * N, *wb = w + s0 * R, *ib = inv_den + s0 * R;
        float *gxb = gx + s0 * N;
        gemm_v16(gu + s0 * G, G, G, wih, NULL, 0, 0, NULL, T, R * N, dM, R * N, 0);  /* dL/dM */
        factors_v16(m + s0 * R, cb, cf, T, R, rp);
        /* forward in time: the sums S again, and a[t,j] = (dM[t,j] . S[t,j]) / D[t,j]^2 */
        memset(S, 0, sizeof(float) * R * np);
        for (int64_t t = 0; t < T; t++) {
            means_step_v16(xb + t * N, S, wb + t * R, ib + t * R, cf[t] ? cb + t * rp : NULL, NULL, R, N, np);
            const float *gt = dM + t * R * N;
            for (int64_t j = 0; j < R; j++) {
                __m512 d = _mm512_setzero_ps();
                for (int64_t v = 0; v < nv; v++)
                    d = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes(N - 16 * v), gt + j * N + 16 * v),
                                        _mm512_load_ps(S + j * np + 16 * v), d);
                a[t * R + j] = _mm512_reduce_add_ps(d) * ib[t * R + j] * ib[t * R + j];
            }
        }
        /* backward in time: Rs and q, scaled from step t + 1's reference to step t's; dL/dx[t] and
         * dL/de[t] = w dL/dw (the weights are exp(e - a shift)) */
        memset(Rs, 0, sizeof(float) * R * np);
        memset(q, 0, sizeof(float) * R);
        for (int64_t t = T - 1; t >= 0; t--) {
            const float *ct = t < T - 1 && cf[t + 1] ? cb + (t + 1) * rp : NULL;
            const float *gt = dM + t * R * N, *xt = xb + t * N;
            __m512 dx[8];  /* N <= 128 here: np / 16 vectors of dL/dx[t] */
            const int held = nv <= 8;
            for (int64_t v = 0; held && v < nv; v++) dx[v] = _mm512_setzero_ps();
            if (!held) memset(gxb + t * N, 0, sizeof(float) * N);
            for (int64_t j = 0; j < R; j++) {
                const float c = ct ? ct[j] : 1.0f, wj = wb[t * R + j];
                const __m512 C = _mm512_set1_ps(c), I = _mm512_set1_ps(ib[t * R + j]), W = _mm512_set1_ps(wj);
                q[j] = q[j] * c + a[t * R + j];
                float *row = Rs + j * np;
                __m512 d = _mm512_setzero_ps();
                for (int64_t v = 0; v < nv; v++) {
                    const __mmask16 k = lanes(N - 16 * v);
                    __m512 r = _mm512_load_ps(row + 16 * v);
                    if (ct) r = _mm512_mul_ps(r, C);
                    r = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, gt + j * N + 16 * v), I, r);
                    _mm512_store_ps(row + 16 * v, r);
                    d = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, xt + 16 * v), r, d);
                    if (held) {
                        dx[v] = _mm512_fmadd_ps(W, r, dx[v]);
                    } else {
                        float *gv = gxb + t * N + 16 * v;
                        _mm512_mask_storeu_ps(gv, k, _mm512_fmadd_ps(W, r, _mm512_maskz_loadu_ps(k, gv)));
                    }
                }
                ge[t * R + j] = (_mm512_reduce_add_ps(d) - q[j]) * wj;
            }
            for (int64_t v = 0; held && v < nv; v++)
                _mm512_mask_storeu_ps(gxb + t * N + 16 * v, lanes(N - 16 * v), dx[v]);
        }
        scores_grad_seq_v16(ge, w2, h + s0 * DA, da, T, DA, R);
        gemm_v16(da, DA, DA, w1, NULL, 0, 0, NULL, T, N, gxb, N, 1);  /* added to the means' part */
    }
    free(S); free(Rs); free(dM); free(cb); free(a); free(q); free(ge); free(da); free(cf);
    return 0;
}

#define FAST_FORWARD_f32 \
    if (vectorised && PH == R) return forward_v16(p, w, u, inv_den, m, B, T, R, G);
#define FAST_BACKWARD_f32 \
    if (vectorised && PH == R) return backward_v16(p, w, inv_den, gu, gp, gw, mulw, m, B, T, R, G);
#else
static int vectorised = 0;
/* Without AVX-512 these are never called (`icaserve_hop_sum_vectorised` says 0); they exist so that
 * the library has the same symbols everywhere. */
int icaserve_gemm_pack_f32(const float *b, int64_t sk, int64_t sc, int64_t K, int64_t Nc, float *out) {
    (void)b; (void)sk; (void)sc; (void)K; (void)Nc; (void)out;
    return 3;
}
int icaserve_gemm_f32(const float *a, int64_t lda, int64_t K, const float *b, int64_t M, int64_t Nc, float *c,
                      int64_t ldc) {
    (void)a; (void)lda; (void)K; (void)b; (void)M; (void)Nc; (void)c; (void)ldc;
    return 3;
}
int icaserve_ica_forward_f32(const float *x, const float *w1t, const float *w2t, const float *rowst, float *h,
                             float *w, float *m, float *inv_den, float *p, float *u, int64_t B, int64_t T,
                             int64_t N, int64_t DA, int64_t R, int64_t G) {
    (void)x; (void)w1t; (void)w2t; (void)rowst; (void)h; (void)w; (void)m; (void)inv_den; (void)p; (void)u;
    (void)B; (void)T; (void)N; (void)DA; (void)R; (void)G;
    return 3;
}
int icaserve_ica_projected_forward_f32(const float *x, const float *w1t, const float *w2t, const float *wiht,
                                       float *h, float *w, float *m, float *inv_den, float *u, int64_t B,
                                       int64_t T, int64_t N, int64_t DA, int64_t R, int64_t G) {
    (void)x; (void)w1t; (void)w2t; (void)wiht; (void)h; (void)w; (void)m; (void)inv_den; (void)u;
    (void)B; (void)T; (void)N; (void)DA; (void)R; (void)G;
    return 3;
}
int icaserve_ica_projected_backward_f32(const float *x, const float *h, const float *w, const float *m,
                                        const float *inv_den, const float *gu, const float *w1, const float *w2,
                                        const float *wih, float *gx, int64_t B, int64_t T, int64_t N, int64_t DA,
                                        int64_t R, int64_t G) {
    (void)x; (void)h; (void)w; (void)m; (void)inv_den; (void)gu; (void)w1; (void)w2; (void)wih; (void)gx;
    (void)B; (void)T; (void)N; (void)DA; (void)R; (void)G;
    return 3;
}
int icaserve_ica_backward_f32(const float *h, const float *w, const float *m, const float *inv_den,
                              const float *p, const float *gu, const float *w1, const float *w2, const float *rows,
                              float *gx, int64_t B, int64_t T, int64_t N, int64_t DA, int64_t R, int64_t G) {
    (void)h; (void)w; (void)m; (void)inv_den; (void)p; (void)gu; (void)w1; (void)w2; (void)rows; (void)gx;
    (void)B; (void)T; (void)N; (void)DA; (void)R; (void)G;
    return 3;
}
#define FAST_FORWARD_f32
#define FAST_BACKWARD_f32
#endif
#define FAST_FORWARD_f64
#define FAST_BACKWARD_f64

/* Whether the AVX-512 path serves the float32 matrix variant; `on` >= 0 sets it first (where it was
 * compiled in: an -march=native build on an AVX-512 machine). Tests run both paths. */
int icaserve_hop_sum_vectorised(int on) {
#if defined(__AVX512F__)
    if (on >= 0) vectorised = on != 0;
#else
    (void)on;
#endif
    return vectorised;
}

#define HOP_SUM(SUFFIX, T_)                                                                         \
BLOCKS(SUFFIX, T_)                                                                                  \
int icaserve_hop_sum_forward_##SUFFIX(const T_ *p, T_ *w, T_ *u, T_ *inv_den, T_ *m,               \
                                      int64_t B, int64_t T, int64_t R, int64_t PH, int64_t G) {     \
    if (m && sizeof(T_) != sizeof(float)) return 2;                                                 \
    FAST_FORWARD_##SUFFIX                                                                           \
    T_ *num = malloc(sizeof(T_) * G * R), *den = malloc(sizeof(T_) * R);                            \
    T_ *part = malloc(sizeof(T_) * G * 16);                                                         \
    if (!num || !den || !part) { free(num); free(den); free(part); return 1; }                      \
    for (int64_t b = 0; b < B; b++) {                                                               \
        memset(num, 0, sizeof(T_) * G * R);                                                         \
        memset(den, 0, sizeof(T_) * R);                                                             \
        for (int64_t t = 0; t < T; t++) {                                                           \
            const T_ *pt = p + (b * T + t) * G * PH;                                                \
            T_ *wt = w + (b * T + t) * R;                                                           \
            T_ *inv = inv_den + (b * T + t) * R;                                                    \
            T_ *ut = u + (b * T + t) * G;                                                           \
            if (m) online_step_##SUFFIX(wt, m + (b * T + t) * R, t, num, den, R, G);                \
            for (int64_t j = 0; j < R; j++) {                                                       \
                den[j] += wt[j];                                                                    \
                inv[j] = 1.0 / den[j];                                                              \
            }                                                                                       \
            memset(part, 0, sizeof(T_) * G * 16);                                                   \
            EACH_BLOCK(FWD_##SUFFIX)                                                                \
            for (int64_t k = 0; k < G; k++) {                                                       \
                T_ acc = 0.0;                                                                       \
                for (int i = 0; i < 16; i++) acc += part[k * 16 + i];                               \
                ut[k] = acc;                                                                        \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
    free(num); free(den); free(part);                                                               \
    return 0;                                                                                       \
}                                                                                                   \
                                                                                                    \
int icaserve_hop_sum_backward_##SUFFIX(const T_ *p, const T_ *w, const T_ *inv_den,                 \
                                       const T_ *gu, T_ *gp, T_ *gw, int mulw, const T_ *m,         \
                                       int64_t B, int64_t T, int64_t R, int64_t PH, int64_t G) {    \
    if (m && sizeof(T_) != sizeof(float)) return 2;                                                 \
    FAST_BACKWARD_##SUFFIX                                                                          \
    T_ *num = malloc(sizeof(T_) * G * R), *a = malloc(sizeof(T_) * T * R);                          \
    T_ *rs = malloc(sizeof(T_) * G * R), *q = malloc(sizeof(T_) * R);                               \
    T_ *gsum = malloc(sizeof(T_) * G);                                                              \
    if (!num || !a || !rs || !q || !gsum) {                                                         \
        free(num); free(a); free(rs); free(q); free(gsum); return 1;                                \
    }                                                                                               \
    for (int64_t b = 0; b < B; b++) {                                                               \
        /* forward in time again: a[t,j] = (sum_k gu[t,k] N[t,k,j]) / D[t,j]^2 */                   \
        memset(num, 0, sizeof(T_) * G * R);                                                         \
        for (int64_t t = 0; t < T; t++) {                                                           \
            const T_ *pt = p + (b * T + t) * G * PH;                                                \
            const T_ *wt = w + (b * T + t) * R;                                                     \
            const T_ *gt = gu + (b * T + t) * G;                                                    \
            const T_ *inv = inv_den + (b * T + t) * R;                                              \
            if (m && t > 0) rescale_##SUFFIX(m + (b * T + t - 1) * R, num, NULL, R, G);             \
            EACH_BLOCK(BWD1_##SUFFIX)                                                               \
        }                                                                                           \
        /* backward in time: the suffix sums Rs and q, and the gradients of step t */               \
        memset(rs, 0, sizeof(T_) * G * R);                                                          \
        memset(q, 0, sizeof(T_) * R);                                                               \
        for (int64_t t = T - 1; t >= 0; t--) {                                                      \
            const T_ *pt = p + (b * T + t) * G * PH;                                                \
            const T_ *wt = w + (b * T + t) * R;                                                     \
            const T_ *gt = gu + (b * T + t) * G;                                                    \
            const T_ *inv = inv_den + (b * T + t) * R;                                              \
            T_ *gpt = gp + (b * T + t) * G * PH;                                                    \
            T_ *gwt = gw + (b * T + t) * R;                                                         \
            if (PH == 1) memset(gsum, 0, sizeof(T_) * G);                                           \
            if (m && t < T - 1) rescale_##SUFFIX(m + (b * T + t) * R, rs, q, R, G);                 \
            EACH_BLOCK(BWD2_##SUFFIX)                                                               \
            if (PH == 1)                                                                            \
                for (int64_t k = 0; k < G; k++) gpt[k] = gsum[k];                                   \
        }                                                                                           \
    }                                                                                               \
    free(num); free(a); free(rs); free(q); free(gsum);                                              \
    return 0;                                                                                       \
}

#define FWD_f32(NB) fwd_block_f32(pt, wt, inv, num, part, R, PH, G, j0, NB)
#define BWD1_f32(NB) bwd1_block_f32(pt, wt, gt, inv, num, a + t * R, R, PH, G, j0, NB)
#define BWD2_f32(NB) bwd2_block_f32(pt, wt, gt, inv, a + t * R, rs, q, gsum, gpt, gwt, R, PH, G, j0, mulw, NB)
#define FWD_f64(NB) fwd_block_f64(pt, wt, inv, num, part, R, PH, G, j0, NB)
#define BWD1_f64(NB) bwd1_block_f64(pt, wt, gt, inv, num, a + t * R, R, PH, G, j0, NB)
#define BWD2_f64(NB) bwd2_block_f64(pt, wt, gt, inv, a + t * R, rs, q, gsum, gpt, gwt, R, PH, G, j0, mulw, NB)

HOP_SUM(f32, float)
HOP_SUM(f64, double)

/* The attention's tanh and its backward in float32, in place (training/hop_sum.py `FoldedICA`):
 * as torch ops, each was a pass with an allocation.
 *
 * a <- tanh(a) = 1 - 2 / (exp(2a) + 1), |a| clamped to 9 (tanh(9) rounds to 1 in float32);
 * absolute error ~1e-7, as torch's 2 sigmoid(2a) - 1. */
int icaserve_tanh_f32(float *a, int64_t n) {
    _Pragma("omp simd")
    for (int64_t i = 0; i < n; i++) {
        const float v = a[i] < -9.0f ? -9.0f : (a[i] > 9.0f ? 9.0f : a[i]);
        a[i] = 1.0f - 2.0f / (exp_f32(2.0f * v) + 1.0f);
    }
    return 0;
}

/* g <- g * (1 - h^2): tanh's backward from its output. */
int icaserve_tanh_backward_f32(float *g, const float *h, int64_t n) {
    _Pragma("omp simd")
    for (int64_t i = 0; i < n; i++) g[i] *= 1.0f - h[i] * h[i];
    return 0;
}
