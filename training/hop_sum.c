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
 * so the big tensors are read once forward and twice backward. Sums run in double, as torch's CPU
 * cumsum accumulates float32.
 *
 * Hops are the innermost axis, taken in blocks of 8, then 4, then one by one: within a block
 * every per-hop quantity is a fixed-length vector the compiler keeps in registers, so each update
 * is a vertical vector operation. (Hop-major order with the gate axis innermost, G = 20, left a
 * scalar remainder loop whose read-modify-write chain through memory took most of the backward;
 * this order measured 1.38x faster backward at batch 32, 1.76x at batch 1, on the shipped shape.)
 *
 * Backward, given gu = dL/du:
 *   Rs[s,k,j] = sum_{t>=s} gu[t,k] / D[t,j]
 *   dL/dp[s,k,j] = w[s,j] Rs[s,k,j]   (PH = 1: summed over j)
 *   dL/dw[s,j]   = sum_k p[s,k,j] Rs[s,k,j] - sum_{t>=s} sum_k gu[t,k] N[t,k,j] / D[t,j]^2
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

/* One block of NB hops (NB = 8, 4 or 1, a compile-time constant after inlining), hops j0..j0+NB-1,
 * at one time step. The dot products over the gate axis alternate between two accumulators so
 * that the sum over k is two dependency chains, not one. */
#define BLOCKS(SUFFIX, T_)                                                                         \
INLINE void fwd_block_##SUFFIX(const T_ *pt, const T_ *wt, const double *inv, double *num,          \
                               double *part, int64_t R, int64_t PH, int64_t G, int64_t j0,          \
                               const int NB) {                                                     \
    double wv[8], iv[8];                                                                           \
    for (int i = 0; i < NB; i++) { wv[i] = wt[j0 + i]; iv[i] = inv[j0 + i]; }                      \
    for (int64_t k = 0; k < G; k++) {                                                              \
        double *nk = num + k * R + j0, *pk_ = part + k * 8;                                        \
        const T_ *pk = pt + (PH == 1 ? k : k * R + j0);                                            \
        _Pragma("omp simd")                                                                        \
        for (int i = 0; i < NB; i++) {                                                             \
            nk[i] += wv[i] * (PH == 1 ? (double)pk[0] : (double)pk[i]);                            \
            pk_[i] += nk[i] * iv[i];                                                               \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
INLINE void bwd1_block_##SUFFIX(const T_ *pt, const T_ *wt, const T_ *gt, const double *inv,        \
                                double *num, double *at, int64_t R, int64_t PH, int64_t G,          \
                                int64_t j0, const int NB) {                                        \
    double wv[8], d0[8], d1[8];                                                                    \
    for (int i = 0; i < NB; i++) { wv[i] = wt[j0 + i]; d0[i] = 0.0; d1[i] = 0.0; }                 \
    for (int64_t k = 0; k < G; k++) {                                                              \
        double *nk = num + k * R + j0, *d = (k & 1) ? d1 : d0;                                     \
        const double gk = gt[k];                                                                   \
        const T_ *pk = pt + (PH == 1 ? k : k * R + j0);                                            \
        _Pragma("omp simd")                                                                        \
        for (int i = 0; i < NB; i++) {                                                             \
            nk[i] += wv[i] * (PH == 1 ? (double)pk[0] : (double)pk[i]);                            \
            d[i] += gk * nk[i];                                                                    \
        }                                                                                          \
    }                                                                                              \
    for (int i = 0; i < NB; i++) at[j0 + i] = (d0[i] + d1[i]) * inv[j0 + i] * inv[j0 + i];        \
}                                                                                                  \
                                                                                                   \
INLINE void bwd2_block_##SUFFIX(const T_ *pt, const T_ *wt, const T_ *gt, const double *inv,        \
                                const double *at, double *rs, double *q, double *gsum, T_ *gpt,     \
                                T_ *gwt, int64_t R, int64_t PH, int64_t G, int64_t j0,              \
                                const int NB) {                                                    \
    double wv[8], iv[8], d0[8], d1[8];                                                             \
    for (int i = 0; i < NB; i++) {                                                                 \
        wv[i] = wt[j0 + i]; iv[i] = inv[j0 + i]; d0[i] = 0.0; d1[i] = 0.0;                         \
        q[j0 + i] += at[j0 + i];                                                                   \
    }                                                                                              \
    for (int64_t k = 0; k < G; k++) {                                                              \
        double *rk = rs + k * R + j0, *d = (k & 1) ? d1 : d0;                                      \
        const double gk = gt[k];                                                                   \
        if (PH == 1) {                                                                             \
            const double pk = pt[k];                                                               \
            double s = 0.0;                                                                        \
            _Pragma("omp simd reduction(+:s)")                                                     \
            for (int i = 0; i < NB; i++) {                                                         \
                rk[i] += gk * iv[i];                                                               \
                s += wv[i] * rk[i];                                                                \
                d[i] += pk * rk[i];                                                                \
            }                                                                                      \
            gsum[k] += s;                                                                          \
        } else {                                                                                   \
            const T_ *pk = pt + k * R + j0;                                                        \
            T_ *gpk = gpt + k * R + j0;                                                            \
            _Pragma("omp simd")                                                                    \
            for (int i = 0; i < NB; i++) {                                                         \
                rk[i] += gk * iv[i];                                                               \
                gpk[i] = (T_)(wv[i] * rk[i]);                                                      \
                d[i] += (double)pk[i] * rk[i];                                                     \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    for (int i = 0; i < NB; i++) gwt[j0 + i] = (T_)(d0[i] + d1[i] - q[j0 + i]);                    \
}

/* Hops in blocks of 8, then one of 4, then one by one. */
#define EACH_BLOCK(CALL)                                                                           \
    {                                                                                              \
        int64_t j0 = 0;                                                                            \
        for (; j0 + 8 <= R; j0 += 8) CALL(8);                                                      \
        if (j0 + 4 <= R) { CALL(4); j0 += 4; }                                                     \
        for (; j0 < R; j0++) CALL(1);                                                              \
    }

#define HOP_SUM(SUFFIX, T_)                                                                        \
BLOCKS(SUFFIX, T_)                                                                                 \
int icaserve_hop_sum_forward_##SUFFIX(const T_ *p, const T_ *w, T_ *u, double *inv_den,            \
                                      int64_t B, int64_t T, int64_t R, int64_t PH, int64_t G) {     \
    double *num = malloc(sizeof(double) * G * R), *den = malloc(sizeof(double) * R);               \
    double *part = malloc(sizeof(double) * G * 8);                                                 \
    if (!num || !den || !part) { free(num); free(den); free(part); return 1; }                     \
    for (int64_t b = 0; b < B; b++) {                                                              \
        memset(num, 0, sizeof(double) * G * R);                                                    \
        memset(den, 0, sizeof(double) * R);                                                        \
        for (int64_t t = 0; t < T; t++) {                                                          \
            const T_ *pt = p + (b * T + t) * G * PH;                                               \
            const T_ *wt = w + (b * T + t) * R;                                                    \
            double *inv = inv_den + (b * T + t) * R;                                               \
            T_ *ut = u + (b * T + t) * G;                                                          \
            for (int64_t j = 0; j < R; j++) {                                                      \
                den[j] += wt[j];                                                                   \
                inv[j] = 1.0 / den[j];                                                             \
            }                                                                                      \
            memset(part, 0, sizeof(double) * G * 8);                                               \
            EACH_BLOCK(FWD_##SUFFIX)                                                               \
            for (int64_t k = 0; k < G; k++) {                                                      \
                double acc = 0.0;                                                                  \
                for (int i = 0; i < 8; i++) acc += part[k * 8 + i];                                \
                ut[k] = (T_)acc;                                                                   \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    free(num); free(den); free(part);                                                              \
    return 0;                                                                                      \
}                                                                                                  \
                                                                                                   \
int icaserve_hop_sum_backward_##SUFFIX(const T_ *p, const T_ *w, const double *inv_den,            \
                                       const T_ *gu, T_ *gp, T_ *gw,                               \
                                       int64_t B, int64_t T, int64_t R, int64_t PH, int64_t G) {    \
    double *num = malloc(sizeof(double) * G * R), *a = malloc(sizeof(double) * T * R);             \
    double *rs = malloc(sizeof(double) * G * R), *q = malloc(sizeof(double) * R);                  \
    double *gsum = malloc(sizeof(double) * G);                                                     \
    if (!num || !a || !rs || !q || !gsum) {                                                        \
        free(num); free(a); free(rs); free(q); free(gsum); return 1;                               \
    }                                                                                              \
    for (int64_t b = 0; b < B; b++) {                                                              \
        /* forward in time again: a[t,j] = (sum_k gu[t,k] N[t,k,j]) / D[t,j]^2 */                  \
        memset(num, 0, sizeof(double) * G * R);                                                    \
        for (int64_t t = 0; t < T; t++) {                                                          \
            const T_ *pt = p + (b * T + t) * G * PH;                                               \
            const T_ *wt = w + (b * T + t) * R;                                                    \
            const T_ *gt = gu + (b * T + t) * G;                                                   \
            const double *inv = inv_den + (b * T + t) * R;                                         \
            EACH_BLOCK(BWD1_##SUFFIX)                                                              \
        }                                                                                          \
        /* backward in time: the suffix sums Rs and q, and the gradients of step t */              \
        memset(rs, 0, sizeof(double) * G * R);                                                     \
        memset(q, 0, sizeof(double) * R);                                                          \
        for (int64_t t = T - 1; t >= 0; t--) {                                                     \
            const T_ *pt = p + (b * T + t) * G * PH;                                               \
            const T_ *wt = w + (b * T + t) * R;                                                    \
            const T_ *gt = gu + (b * T + t) * G;                                                   \
            const double *inv = inv_den + (b * T + t) * R;                                         \
            T_ *gpt = gp + (b * T + t) * G * PH;                                                   \
            T_ *gwt = gw + (b * T + t) * R;                                                        \
            if (PH == 1) memset(gsum, 0, sizeof(double) * G);                                      \
            EACH_BLOCK(BWD2_##SUFFIX)                                                              \
            if (PH == 1)                                                                           \
                for (int64_t k = 0; k < G; k++) gpt[k] = (T_)gsum[k];                              \
        }                                                                                          \
    }                                                                                              \
    free(num); free(a); free(rs); free(q); free(gsum);                                             \
    return 0;                                                                                      \
}

#define FWD_f32(NB) fwd_block_f32(pt, wt, inv, num, part, R, PH, G, j0, NB)
#define BWD1_f32(NB) bwd1_block_f32(pt, wt, gt, inv, num, a + t * R, R, PH, G, j0, NB)
#define BWD2_f32(NB) bwd2_block_f32(pt, wt, gt, inv, a + t * R, rs, q, gsum, gpt, gwt, R, PH, G, j0, NB)
#define FWD_f64(NB) fwd_block_f64(pt, wt, inv, num, part, R, PH, G, j0, NB)
#define BWD1_f64(NB) bwd1_block_f64(pt, wt, gt, inv, num, a + t * R, R, PH, G, j0, NB)
#define BWD2_f64(NB) bwd2_block_f64(pt, wt, gt, inv, a + t * R, rs, q, gsum, gpt, gwt, R, PH, G, j0, NB)

HOP_SUM(f32, float)
HOP_SUM(f64, double)
