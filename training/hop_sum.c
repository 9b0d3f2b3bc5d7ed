/* The prefix-weighted hop sum of folded input-cell attention (training/ica.py `gate_inputs`),
 * forward and backward, one pass over time each way.
 *
 *   u[b,t,:] = sum_j N[b,t,j,:] / D[b,t,j]
 *   N[b,t,j,:] = sum_{s<=t} w[b,s,j] p[b,s,j,:]      D[b,t,j] = sum_{s<=t} w[b,s,j]
 *
 * p is (B, T, PH, G) with PH = R (one projection per hop, the matrix variant) or PH = 1 (shared by
 * every hop, the mean variant); w is (B, T, R); all C-contiguous. Stock torch ops form N as a
 * (B, T, R, G) tensor and pass over it ~20 times forward and backward (the multiply, cumsum and its
 * flip-cumsum-flip backward, the hop matmul and theirs); here it lives in R x G running sums, so
 * the big tensors are read once forward and twice backward. Sums run in double, as torch's CPU
 * cumsum accumulates float32. The dot products over G are vectorised reductions (`omp simd`,
 * compiled with -fopenmp-simd: no threads), whose summation order follows the vector width.
 *
 * Backward, given gu = dL/du:
 *   Rs[s,j,:] = sum_{t>=s} gu[t,:] / D[t,j]
 *   dL/dp[s,j,:] = w[s,j] Rs[s,j,:]   (PH = 1: summed over j)
 *   dL/dw[s,j]   = p[s,j,:] . Rs[s,j,:] - sum_{t>=s} (gu[t,:] . N[t,j,:]) / D[t,j]^2
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define HOP_SUM(SUFFIX, T_)                                                                        \
int icaserve_hop_sum_forward_##SUFFIX(const T_ *p, const T_ *w, T_ *u, double *inv_den,            \
                                      int64_t B, int64_t T, int64_t R, int64_t PH, int64_t G) {     \
    double *num = malloc(sizeof(double) * R * G), *den = malloc(sizeof(double) * R);               \
    double *acc = malloc(sizeof(double) * G);                                                      \
    if (!num || !den || !acc) { free(num); free(den); free(acc); return 1; }                       \
    for (int64_t b = 0; b < B; b++) {                                                              \
        memset(num, 0, sizeof(double) * R * G);                                                    \
        memset(den, 0, sizeof(double) * R);                                                        \
        for (int64_t t = 0; t < T; t++) {                                                          \
            const T_ *pt = p + (b * T + t) * PH * G;                                               \
            const T_ *wt = w + (b * T + t) * R;                                                    \
            double *inv = inv_den + (b * T + t) * R;                                               \
            memset(acc, 0, sizeof(double) * G);                                                    \
            for (int64_t j = 0; j < R; j++) {                                                      \
                const double wj = wt[j];                                                           \
                den[j] += wj;                                                                      \
                const double id = 1.0 / den[j];                                                    \
                inv[j] = id;                                                                       \
                double *nj = num + j * G;                                                          \
                const T_ *pj = pt + (PH == 1 ? 0 : j) * G;                                         \
                for (int64_t k = 0; k < G; k++) {                                                  \
                    nj[k] += wj * pj[k];                                                           \
                    acc[k] += nj[k] * id;                                                          \
                }                                                                                  \
            }                                                                                      \
            T_ *ut = u + (b * T + t) * G;                                                          \
            for (int64_t k = 0; k < G; k++) ut[k] = (T_)acc[k];                                    \
        }                                                                                          \
    }                                                                                              \
    free(num); free(den); free(acc);                                                               \
    return 0;                                                                                      \
}                                                                                                  \
                                                                                                   \
int icaserve_hop_sum_backward_##SUFFIX(const T_ *p, const T_ *w, const double *inv_den,            \
                                       const T_ *gu, T_ *gp, T_ *gw,                               \
                                       int64_t B, int64_t T, int64_t R, int64_t PH, int64_t G) {    \
    double *num = malloc(sizeof(double) * R * G), *a = malloc(sizeof(double) * T * R);             \
    double *rs = malloc(sizeof(double) * R * G), *q = malloc(sizeof(double) * R);                  \
    double *gsum = malloc(sizeof(double) * G);                                                     \
    if (!num || !a || !rs || !q || !gsum) {                                                        \
        free(num); free(a); free(rs); free(q); free(gsum); return 1;                               \
    }                                                                                              \
    for (int64_t b = 0; b < B; b++) {                                                              \
        /* forward in time again: a[t,j] = (gu[t] . N[t,j]) / D[t,j]^2 */                          \
        memset(num, 0, sizeof(double) * R * G);                                                    \
        for (int64_t t = 0; t < T; t++) {                                                          \
            const T_ *pt = p + (b * T + t) * PH * G;                                               \
            const T_ *wt = w + (b * T + t) * R;                                                    \
            const T_ *gt = gu + (b * T + t) * G;                                                   \
            const double *inv = inv_den + (b * T + t) * R;                                         \
            for (int64_t j = 0; j < R; j++) {                                                      \
                const double wj = wt[j];                                                           \
                double dot = 0.0, *nj = num + j * G;                                               \
                const T_ *pj = pt + (PH == 1 ? 0 : j) * G;                                         \
                _Pragma("omp simd reduction(+:dot)")                                               \
                for (int64_t k = 0; k < G; k++) {                                                  \
                    nj[k] += wj * pj[k];                                                           \
                    dot += gt[k] * nj[k];                                                          \
                }                                                                                  \
                a[t * R + j] = dot * inv[j] * inv[j];                                              \
            }                                                                                      \
        }                                                                                          \
        /* backward in time: the suffix sums Rs and q, and the gradients of step t */              \
        memset(rs, 0, sizeof(double) * R * G);                                                     \
        memset(q, 0, sizeof(double) * R);                                                          \
        for (int64_t t = T - 1; t >= 0; t--) {                                                     \
            const T_ *pt = p + (b * T + t) * PH * G;                                               \
            const T_ *wt = w + (b * T + t) * R;                                                    \
            const T_ *gt = gu + (b * T + t) * G;                                                   \
            const double *inv = inv_den + (b * T + t) * R;                                         \
            T_ *gpt = gp + (b * T + t) * PH * G;                                                   \
            T_ *gwt = gw + (b * T + t) * R;                                                        \
            if (PH == 1) memset(gsum, 0, sizeof(double) * G);                                      \
            for (int64_t j = 0; j < R; j++) {                                                      \
                const double id = inv[j], wj = wt[j];                                              \
                double dot = 0.0, *rj = rs + j * G;                                                \
                const T_ *pj = pt + (PH == 1 ? 0 : j) * G;                                         \
                q[j] += a[t * R + j];                                                              \
                if (PH == 1) {                                                                     \
                    _Pragma("omp simd reduction(+:dot)")                                           \
                    for (int64_t k = 0; k < G; k++) {                                              \
                        rj[k] += gt[k] * id;                                                       \
                        gsum[k] += wj * rj[k];                                                     \
                        dot += pj[k] * rj[k];                                                      \
                    }                                                                              \
                } else {                                                                           \
                    T_ *gpj = gpt + j * G;                                                         \
                    _Pragma("omp simd reduction(+:dot)")                                           \
                    for (int64_t k = 0; k < G; k++) {                                              \
                        rj[k] += gt[k] * id;                                                       \
                        gpj[k] = (T_)(wj * rj[k]);                                                 \
                        dot += pj[k] * rj[k];                                                      \
                    }                                                                              \
                }                                                                                  \
                gwt[j] = (T_)(dot - q[j]);                                                         \
            }                                                                                      \
            if (PH == 1)                                                                           \
                for (int64_t k = 0; k < G; k++) gpt[k] = (T_)gsum[k];                              \
        }                                                                                          \
    }                                                                                              \
    free(num); free(a); free(rs); free(q); free(gsum);                                             \
    return 0;                                                                                      \
}

HOP_SUM(f32, float)
HOP_SUM(f64, double)
