/*
 * Bitwise convolution kernels of the binarize packed runtime (docs/runtime.md).
 *
 * Built at first use with the system C compiler (`cc -O3 -march=native -shared -fPIC
 * -pthread`) by binarize_cli/runtime/_build.py and called through ctypes; the NumPy backend
 * (binarize_cli/runtime/kernels.py) implements the same four functions on the same layouts
 * and is the oracle the tests compare this file against.
 *
 * Layouts (all arrays C-contiguous, bit c of a channel group is bit c % 32 of word c / 32):
 *
 *   act   uint32 [B][Hp][Wp][N][Wt]    activation bit planes of the zero-padded input,
 *                                     Wt = G * Cwg words per pixel and plane (Cwg per group)
 *   cols  uint32 [N][Kw][Qp]           "transposed im2col" of one group: row k = (tap, word),
 *                                     Kw = kh * kw * Cwg, column q = output pixel (b, oy, ox),
 *                                     Qp = Q rounded up to a multiple of 16 (zero columns)
 *   wts   uint32 [R][Kw]               weight bit planes of one group, row r = o * M + i
 *   phi   float  [O][M][N]             phi[o][i][j] = alpha_i[o] * beta_j (PA eq. 19)
 *   out   float  [O][Qp]               sum_ij phi[o][i][j] * (cmul * count(o, i, j, q) + cadd)
 *   cnt   int32  [O][M][N][Qp]         count(o, i, j, q)
 *
 * count(o, i, j, q) = sum_k popcount(op(wts[o*M+i][k], cols[j][k][q])), op = AND (PA eq. 20:
 * {0,1} planes) or XNOR (eq. 21: {-1,+1} planes). Integer counts are exact; the caller turns
 * them into dot products (domain algebra and border correction: docs/runtime.md).
 *
 * The inner loop vectorises over output pixels (16 per 512-bit register, 8 per 256-bit one):
 * one weight word is broadcast and combined with 16 pixels' activation words, so no
 * horizontal reduction is ever needed. AVX-512 VPOPCNTDQ, AVX2 (nibble-table popcount) and
 * portable C paths, chosen at compile time.
 */

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#define BK_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__)
#define BK_AVX2 1
#include <immintrin.h>
#endif

#define BK_LANES 16 /* pixels per column block unit (Qp is a multiple of this) */
#define BK_ROWS 4   /* weight rows per register tile */
#define BK_VECS 4   /* 16-pixel vectors per register tile */

int bk_version(void) { return 3; }

/* Which SIMD path this build uses: 2 = AVX-512 VPOPCNTDQ, 1 = AVX2, 0 = portable C. */
int bk_simd(void) {
#if defined(BK_AVX512)
    return 2;
#elif defined(BK_AVX2)
    return 1;
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------------------------ */
/* A minimal parallel for: items 0..n-1 handed out one at a time to nthreads threads.    */
/* ------------------------------------------------------------------------------------ */

typedef void (*bk_item_fn)(void *ctx, int64_t item);

typedef struct {
    bk_item_fn fn;
    void *ctx;
    int64_t items;
    int64_t next;
    pthread_mutex_t lock;
} bk_pool;

static void *pool_worker(void *arg) {
    bk_pool *pool = (bk_pool *)arg;
    for (;;) {
        pthread_mutex_lock(&pool->lock);
        const int64_t item = pool->next++;
        pthread_mutex_unlock(&pool->lock);
        if (item >= pool->items) break;
        pool->fn(pool->ctx, item);
    }
    return NULL;
}

static void parallel_for(bk_item_fn fn, void *ctx, int64_t items, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (items <= 1 || nthreads == 1) {
        for (int64_t i = 0; i < items; ++i) fn(ctx, i);
        return;
    }
    bk_pool pool;
    pool.fn = fn; pool.ctx = ctx; pool.items = items; pool.next = 0;
    pthread_mutex_init(&pool.lock, NULL);
    int spawn = nthreads - 1;
    if (spawn > items - 1) spawn = (int)(items - 1);
    pthread_t *tids = (pthread_t *)malloc(sizeof(pthread_t) * (size_t)spawn);
    int started = 0;
    if (tids)
        for (int t = 0; t < spawn; ++t)
            if (pthread_create(&tids[t], NULL, pool_worker, &pool) == 0) ++started;
    pool_worker(&pool);
    for (int t = 0; t < started; ++t) pthread_join(tids[t], NULL);
    free(tids);
    pthread_mutex_destroy(&pool.lock);
}

/* ------------------------------------------------------------------------------------ */
/* Activation quantization + packing                                                    */
/* ------------------------------------------------------------------------------------ */

/* Number of thresholds <= x (thresholds ascending): the piece index. NaN -> 0. */
static inline int piece_of(double x, const double *thr, int nthr) {
    int lo = 0, hi = nthr;
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        if (x >= thr[mid]) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* For each output word (32 channels of one group at one pixel) the N plane words are built
 * in registers and stored once. Piece index by a branchless count for few thresholds (the
 * common case: N or 2^bits - 1 of them), by binary search otherwise. Work items are input
 * rows (b, y): each writes its own output row. */
typedef struct {
    const void *x;
    int is_f64;
    int B, C, H, W, Cg, Cwg, Wt, nthr, N, ph, pw, Hp, Wp;
    const double *thr;
    const uint32_t *codes;
    uint32_t *act;
} bk_qp;

#define QUANTIZE_ROW(T)                                                                     \
    {                                                                                       \
        const T *x = (const T *)q->x;                                                       \
        for (int g = 0; g < G; ++g) {                                                       \
            for (int wb = 0; wb < q->Cwg; ++wb) {                                           \
                const int c0 = g * q->Cg + wb * 32;                                         \
                const int nc = q->Cg - wb * 32 < 32 ? q->Cg - wb * 32 : 32;                 \
                const T *src = x + ((int64_t)b * q->C + c0) * HW + (int64_t)y * q->W;       \
                uint32_t *dst0 = row + (int64_t)g * q->Cwg + wb;                            \
                for (int xx = 0; xx < q->W; ++xx) {                                         \
                    uint32_t w[32];                                                         \
                    for (int j = 0; j < N; ++j) w[j] = 0;                                   \
                    for (int cc = 0; cc < nc; ++cc) {                                       \
                        const double v = (double)src[cc * HW + xx];                         \
                        int idx;                                                            \
                        if (nthr <= 16) {                                                   \
                            idx = 0;                                                        \
                            for (int k = 0; k < nthr; ++k) idx += v >= thr[k];              \
                        } else {                                                            \
                            idx = piece_of(v, thr, nthr);                                   \
                        }                                                                   \
                        const uint32_t mask = q->codes[idx];                                \
                        for (int j = 0; j < N; ++j) w[j] |= ((mask >> j) & 1u) << cc;       \
                    }                                                                       \
                    uint32_t *dst = dst0 + (int64_t)xx * pix_stride;                        \
                    for (int j = 0; j < N; ++j) dst[(int64_t)j * q->Wt] = w[j];             \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
    }

static void quantize_row(void *ctx, int64_t item) {
    const bk_qp *q = (const bk_qp *)ctx;
    const int b = (int)(item / q->H), y = (int)(item % q->H);
    const int64_t HW = (int64_t)q->H * q->W;
    const int64_t pix_stride = (int64_t)q->N * q->Wt;
    const int G = q->C / q->Cg, N = q->N, nthr = q->nthr;
    const double *thr = q->thr;
    uint32_t *row = q->act + (((int64_t)b * q->Hp + (y + q->ph)) * q->Wp + q->pw) * pix_stride;
    if (q->is_f64) QUANTIZE_ROW(double) else QUANTIZE_ROW(float)
}

static void quantize_pack(const void *x, int is_f64, int B, int C, int H, int W, int Cg, int Cwg,
                          int Wt, const double *thr, int nthr, const uint32_t *codes, int N,
                          int ph, int pw, int Hp, int Wp, uint32_t *act, int nthreads) {
    bk_qp q = {x, is_f64, B, C, H, W, Cg, Cwg, Wt, nthr, N, ph, pw, Hp, Wp, thr, codes, act};
    parallel_for(quantize_row, &q, (int64_t)B * H, nthreads);
}

/* act must be zero on entry (its padding ring stays zero): [B][Hp][Wp][N][Wt], Wt = G * Cwg;
 * input x [B][C][H][W]. */
void bk_quantize_pack_f32(const float *x, int B, int C, int H, int W, int Cg, int Cwg, int Wt,
                          const double *thr, int nthr, const uint32_t *codes, int N, int ph,
                          int pw, int Hp, int Wp, uint32_t *act, int nthreads) {
    quantize_pack(x, 0, B, C, H, W, Cg, Cwg, Wt, thr, nthr, codes, N, ph, pw, Hp, Wp, act, nthreads);
}

void bk_quantize_pack_f64(const double *x, int B, int C, int H, int W, int Cg, int Cwg, int Wt,
                          const double *thr, int nthr, const uint32_t *codes, int N, int ph,
                          int pw, int Hp, int Wp, uint32_t *act, int nthreads) {
    quantize_pack(x, 1, B, C, H, W, Cg, Cwg, Wt, thr, nthr, codes, N, ph, pw, Hp, Wp, act, nthreads);
}

/* ------------------------------------------------------------------------------------ */
/* Transposed im2col of one channel group                                               */
/* ------------------------------------------------------------------------------------ */

/* cols [N][kh*kw*Cwg][Qp] from act [B][Hp][Wp][N][Wt] (words woff .. woff+Cwg). Columns
 * q >= B*Ho*Wo are zeroed. */
void bk_im2col(const uint32_t *act, int B, int Hp, int Wp, int N, int Wt, int woff, int Cwg,
               int kh, int kw, int sh, int sw, int dh, int dw, int Ho, int Wo, int Qp,
               uint32_t *cols) {
    const int64_t Q = (int64_t)B * Ho * Wo;
    const int64_t Kw = (int64_t)kh * kw * Cwg;
    const int64_t pix_stride = (int64_t)N * Wt;
    for (int j = 0; j < N; ++j) {
        for (int ky = 0; ky < kh; ++ky) {
            for (int kx = 0; kx < kw; ++kx) {
                for (int w = 0; w < Cwg; ++w) {
                    const int64_t k = ((int64_t)ky * kw + kx) * Cwg + w;
                    uint32_t *dst = cols + ((int64_t)j * Kw + k) * Qp;
                    int64_t q = 0;
                    for (int b = 0; b < B; ++b) {
                        for (int oy = 0; oy < Ho; ++oy) {
                            const int y = oy * sh + ky * dh;
                            const uint32_t *src = act
                                + (((int64_t)b * Hp + y) * Wp + kx * dw) * pix_stride
                                + (int64_t)j * Wt + woff + w;
                            const int64_t step = (int64_t)sw * pix_stride;
                            for (int ox = 0; ox < Wo; ++ox) dst[q++] = src[ox * step];
                        }
                    }
                    for (; q < Qp; ++q) dst[q] = 0;
                }
            }
        }
    }
    (void)Q;
}

/* ------------------------------------------------------------------------------------ */
/* Binary GEMM: counts of AND / XNOR over Kw words, for weight rows x pixel columns      */
/* ------------------------------------------------------------------------------------ */

typedef struct {
    const uint32_t *wts;
    const uint32_t *cols;
    const float *phi;
    float *out;
    int32_t *cnt;
    int O, M, N, Kw, Qp, op;
    int cmul, cadd;       /* fused output uses phi * (cmul * count + cadd) */
    int64_t R;            /* rows = O * M */
    int64_t nqb;          /* column blocks of BK_VECS * 16 pixels */
    int64_t rows_per_item; /* multiple of lcm-ish(M, BK_ROWS): whole output channels */
    int64_t nrb;          /* row chunks */
    int64_t items;
} bk_job;

/* Sink: tile counts acc[r][v] (lanes = 16 pixels) for rows r0.., plane j, pixels q0.. */
static inline void sink_scalar(bk_job *job, int64_t r, int j, int64_t q, const int32_t *c16,
                               int nlanes) {
    const int o = (int)(r / job->M), i = (int)(r % job->M);
    if (job->cnt) {
        int32_t *dst = job->cnt + ((((int64_t)o * job->M + i) * job->N + j) * job->Qp) + q;
        for (int l = 0; l < nlanes; ++l) dst[l] = c16[l];
    } else {
        const float f = job->phi[((int64_t)o * job->M + i) * job->N + j];
        float *dst = job->out + (int64_t)o * job->Qp + q;
        for (int l = 0; l < nlanes; ++l) dst[l] += f * (float)(job->cmul * c16[l] + job->cadd);
    }
}

#if defined(BK_AVX512)

static inline __m512i bk_op(__m512i w, __m512i a, int op) {
    /* op 0: AND; op 1: XNOR = ~(w ^ a) (ternary-logic truth table 0xC3). */
    return op ? _mm512_ternarylogic_epi32(w, a, a, 0xC3) : _mm512_and_si512(w, a);
}

static void tile_avx512(bk_job *job, int64_t r0, int nr, int j, int64_t q0, int nv) {
    const int Kw = job->Kw, op = job->op;
    const int64_t Qp = job->Qp;
    const uint32_t *A = job->cols + (int64_t)j * Kw * Qp + q0;
    const uint32_t *Wr = job->wts + r0 * Kw;
    __m512i acc[BK_ROWS][BK_VECS];
    for (int r = 0; r < BK_ROWS; ++r)
        for (int v = 0; v < BK_VECS; ++v) acc[r][v] = _mm512_setzero_si512();
    if (nr == BK_ROWS && nv == BK_VECS) {
        for (int k = 0; k < Kw; ++k) {
            const uint32_t *ak = A + (int64_t)k * Qp;
            const __m512i a0 = _mm512_loadu_si512((const void *)(ak));
            const __m512i a1 = _mm512_loadu_si512((const void *)(ak + 16));
            const __m512i a2 = _mm512_loadu_si512((const void *)(ak + 32));
            const __m512i a3 = _mm512_loadu_si512((const void *)(ak + 48));
#define BK_ROW(r)                                                                        \
    {                                                                                    \
        const __m512i w = _mm512_set1_epi32((int)Wr[(int64_t)(r) * Kw + k]);            \
        acc[r][0] = _mm512_add_epi32(acc[r][0], _mm512_popcnt_epi32(bk_op(w, a0, op))); \
        acc[r][1] = _mm512_add_epi32(acc[r][1], _mm512_popcnt_epi32(bk_op(w, a1, op))); \
        acc[r][2] = _mm512_add_epi32(acc[r][2], _mm512_popcnt_epi32(bk_op(w, a2, op))); \
        acc[r][3] = _mm512_add_epi32(acc[r][3], _mm512_popcnt_epi32(bk_op(w, a3, op))); \
    }
            BK_ROW(0) BK_ROW(1) BK_ROW(2) BK_ROW(3)
#undef BK_ROW
        }
    } else {
        for (int k = 0; k < Kw; ++k) {
            const uint32_t *ak = A + (int64_t)k * Qp;
            for (int v = 0; v < nv; ++v) {
                const __m512i a = _mm512_loadu_si512((const void *)(ak + 16 * v));
                for (int r = 0; r < nr; ++r) {
                    const __m512i w = _mm512_set1_epi32((int)Wr[(int64_t)r * Kw + k]);
                    acc[r][v] = _mm512_add_epi32(acc[r][v], _mm512_popcnt_epi32(bk_op(w, a, op)));
                }
            }
        }
    }
    for (int r = 0; r < nr; ++r) {
        const int64_t row = r0 + r;
        const int o = (int)(row / job->M), i = (int)(row % job->M);
        if (job->cnt) {
            int32_t *dst = job->cnt + (((int64_t)o * job->M + i) * job->N + j) * Qp + q0;
            for (int v = 0; v < nv; ++v) _mm512_storeu_si512((void *)(dst + 16 * v), acc[r][v]);
        } else {
            const __m512 f = _mm512_set1_ps(job->phi[((int64_t)o * job->M + i) * job->N + j]);
            const __m512i cm = _mm512_set1_epi32(job->cmul), ca = _mm512_set1_epi32(job->cadd);
            float *dst = job->out + (int64_t)o * Qp + q0;
            for (int v = 0; v < nv; ++v) {
                const __m512i c = _mm512_add_epi32(_mm512_mullo_epi32(acc[r][v], cm), ca);
                __m512 y = _mm512_loadu_ps(dst + 16 * v);
                y = _mm512_fmadd_ps(f, _mm512_cvtepi32_ps(c), y);
                _mm512_storeu_ps(dst + 16 * v, y);
            }
        }
    }
}
#define BK_TILE tile_avx512

#elif defined(BK_AVX2)

/* popcount of each 32-bit lane, nibble-table method: bytes counted by two pshufb lookups,
 * then summed per 32-bit lane with maddubs (bytes -> 16-bit pairs) and madd (-> 32-bit). */
static inline __m256i popcnt8_avx2(__m256i x) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1,
                                         1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i lo = _mm256_and_si256(x, low);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

static inline __m256i bytes_to_lanes(__m256i b8) {
    const __m256i ones8 = _mm256_set1_epi8(1);
    const __m256i ones16 = _mm256_set1_epi16(1);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(b8, ones8), ones16);
}

static inline __m256i bk_op2(__m256i w, __m256i a, int op) {
    const __m256i x = op ? _mm256_xor_si256(w, a) : _mm256_and_si256(w, a);
    return op ? _mm256_xor_si256(x, _mm256_set1_epi32(-1)) : x;
}

/* Tile: 2 rows x 2 vectors of 8 pixels, bytes accumulated for up to 31 words (31*8 < 256). */
static void tile_avx2_2x2(bk_job *job, int64_t r0, int nr, int j, int64_t q0, int nv8,
                          int32_t out32[2][16]) {
    const int Kw = job->Kw, op = job->op;
    const int64_t Qp = job->Qp;
    const uint32_t *A = job->cols + (int64_t)j * Kw * Qp + q0;
    const uint32_t *Wr = job->wts + r0 * Kw;
    __m256i acc32[2][2], acc8[2][2];
    for (int r = 0; r < 2; ++r)
        for (int v = 0; v < 2; ++v) acc32[r][v] = acc8[r][v] = _mm256_setzero_si256();
    int pending = 0;
    for (int k = 0; k < Kw; ++k) {
        const uint32_t *ak = A + (int64_t)k * Qp;
        __m256i a[2];
        a[0] = _mm256_loadu_si256((const __m256i *)ak);
        a[1] = nv8 > 1 ? _mm256_loadu_si256((const __m256i *)(ak + 8)) : _mm256_setzero_si256();
        for (int r = 0; r < nr; ++r) {
            const __m256i w = _mm256_set1_epi32((int)Wr[(int64_t)r * Kw + k]);
            for (int v = 0; v < nv8; ++v)
                acc8[r][v] = _mm256_add_epi8(acc8[r][v], popcnt8_avx2(bk_op2(w, a[v], op)));
        }
        if (++pending == 31) {
            for (int r = 0; r < 2; ++r)
                for (int v = 0; v < 2; ++v) {
                    acc32[r][v] = _mm256_add_epi32(acc32[r][v], bytes_to_lanes(acc8[r][v]));
                    acc8[r][v] = _mm256_setzero_si256();
                }
            pending = 0;
        }
    }
    for (int r = 0; r < 2; ++r)
        for (int v = 0; v < 2; ++v) {
            acc32[r][v] = _mm256_add_epi32(acc32[r][v], bytes_to_lanes(acc8[r][v]));
            _mm256_storeu_si256((__m256i *)(out32[r] + 8 * v), acc32[r][v]);
        }
}

static void tile_avx2(bk_job *job, int64_t r0, int nr, int j, int64_t q0, int nv) {
    int32_t c[2][16];
    for (int rr = 0; rr < nr; rr += 2) {
        const int nr2 = nr - rr < 2 ? nr - rr : 2;
        for (int v = 0; v < nv; ++v) {
            tile_avx2_2x2(job, r0 + rr, nr2, j, q0 + 16 * v, 2, c);
            for (int r = 0; r < nr2; ++r) sink_scalar(job, r0 + rr + r, j, q0 + 16 * v, c[r], 16);
        }
    }
}
#define BK_TILE tile_avx2

#else

static void tile_portable(bk_job *job, int64_t r0, int nr, int j, int64_t q0, int nv) {
    const int Kw = job->Kw, op = job->op;
    const int64_t Qp = job->Qp;
    const uint32_t *A = job->cols + (int64_t)j * Kw * Qp + q0;
    for (int r = 0; r < nr; ++r) {
        const uint32_t *Wr = job->wts + (r0 + r) * Kw;
        for (int v = 0; v < nv; ++v) {
            int32_t c[16] = {0};
            for (int k = 0; k < Kw; ++k) {
                const uint32_t w = Wr[k];
                const uint32_t *ak = A + (int64_t)k * Qp + 16 * v;
                if (op) {
                    for (int l = 0; l < 16; ++l) c[l] += __builtin_popcount(~(w ^ ak[l]));
                } else {
                    for (int l = 0; l < 16; ++l) c[l] += __builtin_popcount(w & ak[l]);
                }
            }
            sink_scalar(job, r0 + r, j, q0 + 16 * v, c, 16);
        }
    }
}
#define BK_TILE tile_portable

#endif

static void run_item(bk_job *job, int64_t item) {
    const int64_t qb = item % job->nqb, rb = item / job->nqb;
    const int64_t q0 = qb * (BK_VECS * BK_LANES);
    int64_t qn = job->Qp - q0;
    if (qn > BK_VECS * BK_LANES) qn = BK_VECS * BK_LANES;
    const int nv = (int)(qn / BK_LANES);
    const int64_t rbeg = rb * job->rows_per_item;
    int64_t rend = rbeg + job->rows_per_item;
    if (rend > job->R) rend = job->R;
    if (!job->cnt) {
        /* Zero this item's output block: rows rbeg..rend cover whole output channels. */
        const int o0 = (int)(rbeg / job->M), o1 = (int)((rend + job->M - 1) / job->M);
        for (int o = o0; o < o1; ++o)
            memset(job->out + (int64_t)o * job->Qp + q0, 0, sizeof(float) * (size_t)qn);
    }
    for (int64_t r = rbeg; r < rend; r += BK_ROWS) {
        const int nr = (int)(rend - r < BK_ROWS ? rend - r : BK_ROWS);
        for (int j = 0; j < job->N; ++j) BK_TILE(job, r, nr, j, q0, nv);
    }
}

static void run_item_cb(void *ctx, int64_t item) { run_item((bk_job *)ctx, item); }

static int bgemm(const uint32_t *wts, int O, int M, const uint32_t *cols, int N, int Kw, int Qp,
                 const float *phi, int op, int cmul, int cadd, float *out, int32_t *cnt,
                 int nthreads) {
    if (Qp % BK_LANES) return -1;
    bk_job job;
    job.cmul = cmul; job.cadd = cadd;
    job.wts = wts; job.cols = cols; job.phi = phi; job.out = out; job.cnt = cnt;
    job.O = O; job.M = M; job.N = N; job.Kw = Kw; job.Qp = Qp; job.op = op;
    job.R = (int64_t)O * M;
    job.nqb = (Qp + BK_VECS * BK_LANES - 1) / (BK_VECS * BK_LANES);
    if (nthreads < 1) nthreads = 1;
    /* Split rows too when there are few column blocks (late layers: 7x7 pixels). Chunks hold
     * whole output channels (a multiple of M rows) and whole tiles (a multiple of BK_ROWS). */
    int64_t unit = (int64_t)M * BK_ROWS;
    int64_t want = (4 * (int64_t)nthreads + job.nqb - 1) / job.nqb; /* row chunks wanted */
    int64_t per = (job.R + want - 1) / want;
    per = ((per + unit - 1) / unit) * unit;
    if (per < unit) per = unit;
    job.rows_per_item = per;
    job.nrb = (job.R + per - 1) / per;
    job.items = job.nqb * job.nrb;
    parallel_for(run_item_cb, &job, job.items, nthreads);
    return 0;
}

/* out [O][Qp] = sum_ij phi[o][i][j] * (cmul * count(o, i, j, q) + cadd). */
int bk_bgemm_f32(const uint32_t *wts, int O, int M, const uint32_t *cols, int N, int Kw, int Qp,
                 const float *phi, int op, int cmul, int cadd, float *out, int nthreads) {
    return bgemm(wts, O, M, cols, N, Kw, Qp, phi, op, cmul, cadd, out, NULL, nthreads);
}

/* cnt [O][M][N][Qp] = count(o, i, j, q). */
int bk_bgemm_counts(const uint32_t *wts, int O, int M, const uint32_t *cols, int N, int Kw,
                    int Qp, int op, int32_t *cnt, int nthreads) {
    return bgemm(wts, O, M, cols, N, Kw, Qp, NULL, op, 1, 0, NULL, cnt, nthreads);
}
