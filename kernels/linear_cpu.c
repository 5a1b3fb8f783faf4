/* accelc native CPU kernel: y = x @ w^T (+ b) for the few rows of decode and speculative verification.
 *
 * x: (M, K) fp32, row stride ldx; w: (N, K) fp32 contiguous (the nn.Linear layout, siblings
 * concatenated by pack_linear); b: (N,) or NULL; y: (M, N), row stride ldy.
 *
 * Decode and verification multiply a handful of rows by every weight matrix, so the cost is
 * reading the weights from memory once.  The kernel streams 4 weight rows at a time and reuses
 * them, from L1, for every pair of input rows: the weights are read from DRAM exactly once whatever
 * M is.  The next 4 rows are prefetched evenly over all passes of the current block, so memory
 * stays busy while the rows are multiplied; verifying 9 tokens costs ~1.3 decode steps, not 2-4.
 *
 * Batch invariance: output (m, n) is always accumulated the same way -- 8 fp32 lanes over k in
 * steps of 8, reduced in a fixed order, then the k tail in order -- whatever M, the position of
 * row m in the batch or the thread count.  A row's result therefore does not depend on which other
 * rows are multiplied with it: the verification forward of speculative decoding computes exactly
 * the logits plain decoding would.
 *
 * Built at first use by accelc/kernels/linear.py (cc -O3 -mavx2 -mfma -ffp-contract=off -fopenmp, plus
 * -mavx512f on AVX-512 CPUs, which selects the variant below), cached on disk.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define ROWS 4

static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    __m128 s = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, s);
    s = _mm_add_ss(s, sh);
    return _mm_cvtss_f32(s);
}

int accelc_linear_abi(void) { return 1; }

#ifdef __AVX512F__
/* AVX-512 build (CPUs whose torch capability is AVX512): 16 fp32 lanes, and up to 4 input rows
 * per pass over a block of 4 weight rows (16 accumulators of the 32 zmm registers), so a pass
 * issues 8 loads per 16 FMAs instead of 6 per 8: verification widths are bound by the FMA units
 * about half as long.  Batch invariance as above: output (m, n) is accumulated in 16 lanes over k
 * in steps of 16, reduced by the same instruction sequence, then the k tail in order, whichever
 * group of 4, 2 or 1 rows it is computed in. */
#define XR_MAX 4

int accelc_linear_isa(void) { return 512; }

static inline __attribute__((always_inline)) void rows_pass(const int xr, const float *x, int64_t ldx,
        const float *w0, const float *w1, const float *w2, const float *w3, const float *b, float *y, int64_t ldy,
        int64_t n0, int64_t nn, int64_t K, int64_t K16, const float *next, int64_t next_len, int64_t iters,
        int64_t lines, int64_t *it, int64_t *pf) {
    __m512 acc[XR_MAX][ROWS];
    for (int i = 0; i < xr; ++i)
        for (int j = 0; j < ROWS; ++j)
            acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K16; k += 16) {
        *it += lines;
        while (*it >= iters && *pf < next_len) {
            _mm_prefetch((const char *)(next + *pf), _MM_HINT_T0);
            *pf += 16;
            *it -= iters;
        }
        const __m512 v0 = _mm512_loadu_ps(w0 + k), v1 = _mm512_loadu_ps(w1 + k);
        const __m512 v2 = _mm512_loadu_ps(w2 + k), v3 = _mm512_loadu_ps(w3 + k);
        for (int i = 0; i < xr; ++i) {
            const __m512 xv = _mm512_loadu_ps(x + i * ldx + k);
            acc[i][0] = _mm512_fmadd_ps(v0, xv, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(v1, xv, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(v2, xv, acc[i][2]);
            acc[i][3] = _mm512_fmadd_ps(v3, xv, acc[i][3]);
        }
    }
    const float *ws[ROWS] = {w0, w1, w2, w3};
    for (int i = 0; i < xr; ++i) {
        const float *xi = x + i * ldx;
        for (int j = 0; j < (int)nn; ++j) {
            float r = _mm512_reduce_add_ps(acc[i][j]);
            for (int64_t k = K16; k < K; ++k)
                r = fmaf(ws[j][k], xi[k], r);
            y[i * ldy + n0 + j] = r + (b ? b[n0 + j] : 0.0f);
        }
    }
}

void accelc_linear(const float *x, int64_t ldx, const float *w, const float *b, float *y, int64_t ldy,
                   int64_t M, int64_t N, int64_t K, int nthreads) {
    const int64_t K16 = K & ~(int64_t)15;
    const int64_t blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t n0 = blk * ROWS;
        const int64_t nn = N - n0 < ROWS ? N - n0 : ROWS;
        /* rows past N alias row n0: computed, never stored */
        const float *w0 = w + n0 * K;
        const float *w1 = nn > 1 ? w0 + K : w0;
        const float *w2 = nn > 2 ? w0 + 2 * K : w0;
        const float *w3 = nn > 3 ? w0 + 3 * K : w0;
        const float *next = blk + 1 < blocks ? w + (n0 + ROWS) * K : w0;
        const int64_t next_len = blk + 1 < blocks ? (N - n0 - ROWS < ROWS ? N - n0 - ROWS : ROWS) * K : 0;
        const int64_t passes = M / 4 + ((M % 4) >= 2) + (M % 2);
        const int64_t iters = passes * (K16 / 16) > 0 ? passes * (K16 / 16) : 1;
        const int64_t lines = (next_len + 15) / 16;
        int64_t it = 0, pf = 0, m = 0;
        for (; m + 4 <= M; m += 4)
            rows_pass(4, x + m * ldx, ldx, w0, w1, w2, w3, b, y + m * ldy, ldy, n0, nn, K, K16, next, next_len, iters, lines, &it, &pf);
        if (m + 2 <= M) {
            rows_pass(2, x + m * ldx, ldx, w0, w1, w2, w3, b, y + m * ldy, ldy, n0, nn, K, K16, next, next_len, iters, lines, &it, &pf);
            m += 2;
        }
        if (m < M)
            rows_pass(1, x + m * ldx, ldx, w0, w1, w2, w3, b, y + m * ldy, ldy, n0, nn, K, K16, next, next_len, iters, lines, &it, &pf);
    }
}

#else

int accelc_linear_isa(void) { return 256; }

void accelc_linear(const float *x, int64_t ldx, const float *w, const float *b, float *y, int64_t ldy,
                   int64_t M, int64_t N, int64_t K, int nthreads) {
    const int64_t K8 = K & ~(int64_t)7;
    const int64_t blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t n0 = blk * ROWS;
        const int64_t nn = N - n0 < ROWS ? N - n0 : ROWS;
        /* rows past N alias row n0: computed, never stored */
        const float *w0 = w + n0 * K;
        const float *w1 = nn > 1 ? w0 + K : w0;
        const float *w2 = nn > 2 ? w0 + 2 * K : w0;
        const float *w3 = nn > 3 ? w0 + 3 * K : w0;
        const float *next = blk + 1 < blocks ? w + (n0 + ROWS) * K : w0;
        const int64_t next_len = blk + 1 < blocks ? (N - n0 - ROWS < ROWS ? N - n0 - ROWS : ROWS) * K : 0;
        const int64_t passes = (M + 1) / 2;
        const int64_t iters = passes * (K8 / 8) > 0 ? passes * (K8 / 8) : 1; /* k-steps in this block */
        const int64_t lines = (next_len + 15) / 16;                            /* cache lines to fetch */
        int64_t it = 0, pf = 0;
        for (int64_t m = 0; m < M; m += 2) {
            const int two = m + 1 < M;
            const float *x0 = x + m * ldx;
            const float *x1 = two ? x0 + ldx : x0;
            __m256 a00 = _mm256_setzero_ps(), a01 = _mm256_setzero_ps(), a02 = _mm256_setzero_ps(), a03 = _mm256_setzero_ps();
            __m256 a10 = _mm256_setzero_ps(), a11 = _mm256_setzero_ps(), a12 = _mm256_setzero_ps(), a13 = _mm256_setzero_ps();
            for (int64_t k = 0; k < K8; k += 8) {
                /* spread the prefetch of the next block's rows evenly over all passes */
                it += lines;
                while (it >= iters && pf < next_len) {
                    _mm_prefetch((const char *)(next + pf), _MM_HINT_T0);
                    pf += 16;
                    it -= iters;
                }
                const __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
                const __m256 v2 = _mm256_loadu_ps(w2 + k), v3 = _mm256_loadu_ps(w3 + k);
                const __m256 xa = _mm256_loadu_ps(x0 + k), xb = _mm256_loadu_ps(x1 + k);
                a00 = _mm256_fmadd_ps(v0, xa, a00);
                a01 = _mm256_fmadd_ps(v1, xa, a01);
                a02 = _mm256_fmadd_ps(v2, xa, a02);
                a03 = _mm256_fmadd_ps(v3, xa, a03);
                a10 = _mm256_fmadd_ps(v0, xb, a10);
                a11 = _mm256_fmadd_ps(v1, xb, a11);
                a12 = _mm256_fmadd_ps(v2, xb, a12);
                a13 = _mm256_fmadd_ps(v3, xb, a13);
            }
            float r0[ROWS] = {hsum8(a00), hsum8(a01), hsum8(a02), hsum8(a03)};
            float r1[ROWS] = {hsum8(a10), hsum8(a11), hsum8(a12), hsum8(a13)};
            for (int64_t k = K8; k < K; ++k) {
                r0[0] = fmaf(w0[k], x0[k], r0[0]);
                r0[1] = fmaf(w1[k], x0[k], r0[1]);
                r0[2] = fmaf(w2[k], x0[k], r0[2]);
                r0[3] = fmaf(w3[k], x0[k], r0[3]);
                r1[0] = fmaf(w0[k], x1[k], r1[0]);
                r1[1] = fmaf(w1[k], x1[k], r1[1]);
                r1[2] = fmaf(w2[k], x1[k], r1[2]);
                r1[3] = fmaf(w3[k], x1[k], r1[3]);
            }
            for (int64_t j = 0; j < nn; ++j) {
                const float bj = b ? b[n0 + j] : 0.0f;
                y[m * ldy + n0 + j] = r0[j] + bj;
                if (two)
                    y[(m + 1) * ldy + n0 + j] = r1[j] + bj;
            }
        }
    }
}

#endif
