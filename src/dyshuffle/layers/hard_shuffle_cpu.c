/* The hard dynamic shuffle of inference on the CPU, in one call (issue 5).
 *
 * dyshuffle/layers/fused_cpu.py compiles this file with the system's C compiler on first use and
 * calls dys_hard_shuffle through ctypes. It is the algorithm of the Triton kernel in fused.py:
 * per sample, pool the channels of the concatenation of one or two channels_last parts, run the
 * two-layer generator, take the softmax of every factor row, choose each factor's permutation
 * from its table, look up the composed index and copy the channels to their places. Phase 1
 * (descriptor to choice) is parallel over samples, phase 2 (the copy) over pixels of all
 * samples, both on the OpenMP runtime that PyTorch has already loaded (the same libgomp.so.1).
 *
 * The pooled means, the generator and the softmax are float32; the copied values are moved as
 * bits, never converted.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { DYS_F32 = 0, DYS_BF16 = 1, DYS_F16 = 2 };

static inline float bf16_value(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float f16_value(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, u;
    if (exponent == 0) {
        if (mantissa == 0) {
            u = sign;
        } else { /* subnormal: shift the mantissa up to its leading one */
            int e = -1;
            do {
                e++;
                mantissa <<= 1;
            } while (!(mantissa & 0x400u));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mantissa & 0x3ffu) << 13);
        }
    } else if (exponent == 31) {
        u = sign | 0x7f800000u | (mantissa << 13);
    } else {
        u = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* acc[c] += x[n, c, h, w] over all pixels of one sample of one part */
static void pool_part(const char* base, int dtype, int64_t channels, int64_t height,
                      int64_t width, int64_t sh, int64_t sw, float* acc) {
    for (int64_t h = 0; h < height; h++) {
        for (int64_t w = 0; w < width; w++) {
            int64_t off = h * sh + w * sw;
            if (dtype == DYS_F32) {
                const float* v = (const float*)base + off;
                for (int64_t c = 0; c < channels; c++) acc[c] += v[c];
            } else if (dtype == DYS_BF16) {
                const uint16_t* v = (const uint16_t*)base + off;
                for (int64_t c = 0; c < channels; c++) acc[c] += bf16_value(v[c]);
            } else {
                const uint16_t* v = (const uint16_t*)base + off;
                for (int64_t c = 0; c < channels; c++) acc[c] += f16_value(v[c]);
            }
        }
    }
}

/* sum_c u[c] * v[c] in 8 interleaved partial sums (vectorizable, no serial dependency chain) */
static inline float dot(const float* u, const float* v, int64_t count) {
    float part[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int64_t c = 0;
    for (; c + 8 <= count; c += 8)
        for (int i = 0; i < 8; i++) part[i] += u[c + i] * v[c + i];
    float total = 0.0f;
    for (; c < count; c++) total += u[c] * v[c];
    for (int i = 0; i < 8; i++) total += part[i];
    return total;
}

typedef struct {
    const char *x0, *x1;
    int dtype;
    int64_t c0, channels, height, width;
    int64_t s0n, s0h, s0w, s1n, s1h, s1w;
    const float *w1, *b1, *w2, *b2, *table;
    const int32_t* segment;
    const int64_t* index;
    int64_t hidden, num_logits, num_a, num_b;
    float inv_pixels, inv_tau;
} problem;

/* phase 1 for sample n: the row of the chosen pair of permutations (i * num_b + j) */
static int64_t choose(const problem* q, int64_t n, float* scratch) {
    int64_t channels = q->channels, nl = q->num_logits, nk = q->num_a + q->num_b;
    int64_t esize = q->dtype == DYS_F32 ? 4 : 2;
    float* pooled = scratch;
    float* logits = pooled + channels;
    float* soft = logits + nl;
    float* row_max = soft + nl;
    float* row_sum = row_max + nl;
    memset(pooled, 0, sizeof(float) * channels);
    pool_part(q->x0 + n * q->s0n * esize, q->dtype, q->c0, q->height, q->width, q->s0h, q->s0w,
              pooled);
    if (q->c0 < channels)
        pool_part(q->x1 + n * q->s1n * esize, q->dtype, channels - q->c0, q->height, q->width,
                  q->s1h, q->s1w, pooled + q->c0);
    for (int64_t c = 0; c < channels; c++) pooled[c] *= q->inv_pixels;

    for (int64_t l = 0; l < nl; l++) logits[l] = q->b2[l];
    for (int64_t j = 0; j < q->hidden; j++) {
        float hj = dot(q->w1 + j * channels, pooled, channels) + q->b1[j];
        if (hj < 0.0f) hj = 0.0f; /* ReLU that keeps NaN, as torch.relu does */
        for (int64_t l = 0; l < nl; l++) logits[l] += q->w2[l * q->hidden + j] * hj;
    }
    /* softmax of every row (segment[l]: the row of logit l); rows are at most nl */
    for (int64_t l = 0; l < nl; l++) {
        logits[l] *= q->inv_tau;
        row_max[l] = -INFINITY;
        row_sum[l] = 0.0f;
    }
    for (int64_t l = 0; l < nl; l++) {
        int32_t s = q->segment[l];
        if (logits[l] > row_max[s]) row_max[s] = logits[l];
    }
    for (int64_t l = 0; l < nl; l++) {
        soft[l] = expf(logits[l] - row_max[q->segment[l]]);
        row_sum[q->segment[l]] += soft[l];
    }
    for (int64_t l = 0; l < nl; l++) soft[l] /= row_sum[q->segment[l]];

    /* each factor's nearest permutation: argmax_k <M, P_k>, the first on ties (and the first
     * when all are NaN, as torch.argmax) */
    int64_t best_a = 0, best_b = q->num_a;
    float score_a = -INFINITY, score_b = -INFINITY;
    for (int64_t k = 0; k < nk; k++) {
        const float* t = q->table + k * nl;
        float s = 0.0f;
        for (int64_t l = 0; l < nl; l++) s += t[l] * soft[l];
        if (k < q->num_a) {
            if (s > score_a) score_a = s, best_a = k;
        } else if (s > score_b) {
            score_b = s, best_b = k;
        }
    }
    return best_a * q->num_b + (best_b - q->num_a);
}

/* one output pixel: the pixel's channels of both parts side by side in ``row`` (two contiguous
 * copies), then the permutation read from there, written in order */
#define DYS_COPY(T)                                                                             \
    do {                                                                                        \
        T* row = (T*)buffer;                                                                    \
        memcpy(row, (const T*)q->x0 + n * q->s0n + h * q->s0h + w * q->s0w, c0 * sizeof(T));    \
        memcpy(row + c0, (const T*)q->x1 + n * q->s1n + h * q->s1h + w * q->s1w,                \
               (channels - c0) * sizeof(T));                                                    \
        T* o = (T*)out + ((n * q->height + h) * q->width + w) * channels;                       \
        for (int64_t c = 0; c < channels; c++) o[c] = row[src[c]];                              \
    } while (0)

/* phase 2: the output pixels t in [start, stop) of the flattened (N, H * W); ``buffer`` holds
 * one pixel's channels */
static void copy_pixels(const problem* q, void* out, const int64_t* rows, void* buffer,
                        int64_t start, int64_t stop) {
    int64_t channels = q->channels, c0 = q->c0, pixels = q->height * q->width;
    for (int64_t t = start; t < stop;) {
        int64_t n = t / pixels, p = t % pixels;
        int64_t end = (n + 1) * pixels < stop ? (n + 1) * pixels : stop;
        const int64_t* src = q->index + rows[n] * channels;
        for (; t < end; t++, p++) {
            int64_t h = p / q->width, w = p % q->width;
            if (q->dtype == DYS_F32)
                DYS_COPY(uint32_t);
            else
                DYS_COPY(uint16_t);
        }
    }
}

/* y[n, c] = cat(x0, x1)[n, index[row_n, c]] into ``out``, the (N, C, H, W) channels_last output
 * (contiguous). x1 is read for channels c0..C-1 (pass x0 and c0 = C for one part). Strides are in
 * elements. rows_out (N int64s, or NULL) receives the chosen rows. Returns 0, or -1 when scratch
 * memory could not be allocated (then nothing was written). */
int dys_hard_shuffle(const void* x0, const void* x1, void* out, int dtype, int64_t batch,
                     int64_t c0, int64_t channels, int64_t height, int64_t width, int64_t s0n,
                     int64_t s0h, int64_t s0w, int64_t s1n, int64_t s1h, int64_t s1w,
                     const float* w1, const float* b1, const float* w2, const float* b2,
                     int64_t hidden, int64_t num_logits, const float* table,
                     const int32_t* segment, int64_t num_a, int64_t num_b, const int64_t* index,
                     float inv_tau, int threads, int64_t* rows_out) {
    problem q = {(const char*)x0, (const char*)x1, dtype, c0, channels, height, width,
                 s0n, s0h, s0w, s1n, s1h, s1w, w1, b1, w2, b2, table, segment, index,
                 hidden, num_logits, num_a, num_b, 1.0f / (float)(height * width), inv_tau};
    int64_t pixels = height * width;
    if (batch == 0 || pixels == 0) return 0;
    if (threads < 1) threads = 1;
    /* per thread: the scratch of choose(), then one pixel's channels (at most 4 bytes each) */
    int64_t per_thread = 2 * channels + 4 * num_logits;
    int64_t* rows = (int64_t*)malloc(sizeof(int64_t) * (size_t)batch);
    float* scratch = (float*)malloc(sizeof(float) * (size_t)(threads * per_thread));
    int failed = rows == NULL || scratch == NULL;
    if (!failed) {
        int parallel = threads > 1 && batch * pixels * channels >= 16384;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (parallel)
#endif
        {
            int64_t tid = 0, nth = 1;
#ifdef _OPENMP
            tid = omp_get_thread_num();
            nth = omp_get_num_threads();
#endif
            float* mine = scratch + tid * per_thread;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t n = 0; n < batch; n++) rows[n] = choose(&q, n, mine);
            /* (the loop's implicit barrier: every sample has its row before any is copied) */
            int64_t total = batch * pixels;
            copy_pixels(&q, out, rows, mine + channels + 4 * num_logits, total * tid / nth,
                        total * (tid + 1) / nth);
        }
        (void)parallel;
        if (rows_out != NULL) memcpy(rows_out, rows, sizeof(int64_t) * (size_t)batch);
    }
    free(rows);
    free(scratch);
    return failed ? -1 : 0;
}
