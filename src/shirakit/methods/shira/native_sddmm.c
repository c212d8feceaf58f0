/* SHiRA's value-gradient kernels in C (see cpu_sddmm.py): the transposes and the sampled dots.
 *
 * Built at first use by native_sddmm.py with the system C compiler (-O3 -march=native) and called
 * through ctypes, which releases the GIL. GCC/Clang vector extensions, no intrinsics: vectors of
 * LANES floats (16 with AVX-512, else 8: one AVX2 register, two NEON ones).
 *
 * Why C next to the numba kernels: numba vectorizes the 8-row dot loop 4 floats wide and its
 * transposes element by element; here the transposes go through LANES x LANES register blocks
 * and the dots are LANES floats wide, 8 sums in registers, one shuffle-tree reduction per 8 dots.
 */
#include <stdint.h>
#include <string.h>

/* The accumulator width follows the registers there are: with AVX-512 a 16-float vector is one of
 * 32 registers; with AVX2 (16 registers of 8 floats) 8 accumulators of 16 floats would need all 16
 * registers for the sums alone, and GCC then keeps them on the stack (every multiply-add a load and
 * a store: 2.4 GMAC/s on an AVX2 EPYC, against several times that with 8-float sums in registers). */
#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
typedef float v8 __attribute__((vector_size(32)));
typedef float vec __attribute__((vector_size(LANES * 4)));
#if LANES == 16
typedef float v16 __attribute__((vector_size(64)));
static inline v16 load16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
#endif

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline vec loadv(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }

/* one tree step: lanes (2j, 2j + 1) of a and of b summed, a's and b's sums interleaved */
static inline v8 pair_sums(v8 a, v8 b) {
    return __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14)
         + __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
}

/* 8 lanes of a vector summed pairwise down to 8 (one vector of 8 floats: itself, or two halves) */
static inline v8 fold8(vec v) {
#if LANES == 16
    return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
         + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    return v;
#endif
}

/* out[p] = the sum of acc[p]'s lanes, p < 8, by shuffles and adds (no scalar loop) */
static inline void hsum8(const vec *acc, float *out) {
    v8 s[8];
    for (int p = 0; p < 8; p++) s[p] = fold8(acc[p]);
    v8 t0 = pair_sums(s[0], s[1]), t1 = pair_sums(s[2], s[3]), t2 = pair_sums(s[4], s[5]);
    v8 t3 = pair_sums(s[6], s[7]);
    v8 u0 = __builtin_shufflevector(t0, t1, 0, 1, 8, 9, 4, 5, 12, 13)
          + __builtin_shufflevector(t0, t1, 2, 3, 10, 11, 6, 7, 14, 15);
    v8 u1 = __builtin_shufflevector(t2, t3, 0, 1, 8, 9, 4, 5, 12, 13)
          + __builtin_shufflevector(t2, t3, 2, 3, 10, 11, 6, 7, 14, 15);
    v8 w = __builtin_shufflevector(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11)
         + __builtin_shufflevector(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
    memcpy(out, &w, sizeof w);
}

/* out[p] = a . b[p] for p < N over width floats (a multiple of 16): one load of a feeds N dots */
#define DOTS_SHARING_A(N)                                                                  \
    static inline void dots_sharing_a_##N(const float *a, const float *const *b, float *out, \
                                          long width) {                                    \
        vec acc[8];                                                                        \
        for (int p = 0; p < 8; p++) acc[p] = (vec){0};                                     \
        for (long t = 0; t < width; t += LANES) {                                          \
            vec at = loadv(a + t);                                                         \
            for (int p = 0; p < N; p++) acc[p] += at * loadv(b[p] + t);                    \
        }                                                                                  \
        float sums[8];                                                                     \
        hsum8(acc, sums);                                                                  \
        memcpy(out, sums, N * sizeof(float));                                              \
    }
DOTS_SHARING_A(8)
DOTS_SHARING_A(7)
DOTS_SHARING_A(6)
DOTS_SHARING_A(5)
DOTS_SHARING_A(4)
DOTS_SHARING_A(3)
DOTS_SHARING_A(2)
DOTS_SHARING_A(1)

typedef void (*dots_sharing_a_fn)(const float *, const float *const *, float *, long);
static const dots_sharing_a_fn DOTS_SHARING_A_BY_RUN[9] = {
    0, dots_sharing_a_1, dots_sharing_a_2, dots_sharing_a_3, dots_sharing_a_4,
    dots_sharing_a_5, dots_sharing_a_6, dots_sharing_a_7, dots_sharing_a_8};

/* out[k] = a_rows[ia[k]] . b_rows[ib[k]] for k in [start, stop): each run of up to 8 equal ia
 * (positions sorted row-major share a row of a) is one pass over a */
#define SAMPLED_DOTS(NAME, INDEX)                                                                  \
    void NAME(const float *a_rows, const float *b_rows, const INDEX *ia, const INDEX *ib,          \
              float *out, long width, long start, long stop) {                                     \
        const float *b[8];                                                                         \
        long k = start;                                                                            \
        while (k < stop) {                                                                         \
            long run = 1;                                                                          \
            while (run < 8 && k + run < stop && ia[k + run] == ia[k]) run++;                       \
            for (long p = 0; p < run; p++) b[p] = b_rows + (long)ib[k + p] * width;                \
            DOTS_SHARING_A_BY_RUN[run](a_rows + (long)ia[k] * width, b, out + k, width);            \
            k += run;                                                                              \
        }                                                                                          \
    }
SAMPLED_DOTS(shirakit_dots_i64, int64_t)
SAMPLED_DOTS(shirakit_dots_i32, int32_t)

#if LANES == 16
/* A 16 x 16 block transposed in registers (AVX-512: 16 of its 32 registers): four stages, each swapping the off-diagonal d x d
 * sub-blocks (d = 8, 4, 2, 1) of every 2d x 2d block, one two-source shuffle per output row. */
static inline void transpose16(const float *src, long src_stride, float *dst, long dst_stride) {
    v16 r[16];
    for (int i = 0; i < 16; i++) r[i] = load16(src + i * src_stride);
    for (int i = 0; i < 16; i++)
        if (!(i & 8)) {
            v16 a = r[i], b = r[i + 8];
            r[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
            r[i + 8] = __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
        }
    for (int i = 0; i < 16; i++)
        if (!(i & 4)) {
            v16 a = r[i], b = r[i + 4];
            r[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
            r[i + 4] = __builtin_shufflevector(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
        }
    for (int i = 0; i < 16; i++)
        if (!(i & 2)) {
            v16 a = r[i], b = r[i + 2];
            r[i] = __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
            r[i + 2] = __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
        }
    for (int i = 0; i < 16; i++)
        if (!(i & 1)) {
            v16 a = r[i], b = r[i + 1];
            r[i] = __builtin_shufflevector(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
            r[i + 1] = __builtin_shufflevector(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
        }
    for (int i = 0; i < 16; i++) memcpy(dst + i * dst_stride, &r[i], sizeof r[i]);
}

#define transpose_block transpose16
#else
/* An 8 x 8 block transposed in registers (AVX2: 8 of its 16; a 16 x 16 block would spill): three
 * stages, each swapping the off-diagonal d x d sub-blocks (d = 4, 2, 1) of every 2d x 2d block. */
static inline void transpose8(const float *src, long src_stride, float *dst, long dst_stride) {
    v8 r[8];
    for (int i = 0; i < 8; i++) r[i] = load8(src + i * src_stride);
    for (int i = 0; i < 8; i++)
        if (!(i & 4)) {
            v8 a = r[i], b = r[i + 4];
            r[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11);
            r[i + 4] = __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
        }
    for (int i = 0; i < 8; i++)
        if (!(i & 2)) {
            v8 a = r[i], b = r[i + 2];
            r[i] = __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13);
            r[i + 2] = __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int i = 0; i < 8; i++)
        if (!(i & 1)) {
            v8 a = r[i], b = r[i + 1];
            r[i] = __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14);
            r[i + 1] = __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
        }
    for (int i = 0; i < 8; i++) memcpy(dst + i * dst_stride, &r[i], sizeof r[i]);
}
#define transpose_block transpose8
#endif

/* dst[c, t] = src[t, c] for the columns c in [c0, c1) and all tokens, zeros for t in [tokens,
 * width). src: tokens x cols, row-major; dst: rows of width floats. Token blocks outside: the
 * LANES source rows of a block are read in order (no 4 KB-strided column walk). */
void shirakit_transpose_f32(const float *src, long tokens, long cols, float *dst, long width,
                            long c0, long c1) {
    long full_t = tokens / LANES * LANES, full_c = c0 + (c1 - c0) / LANES * LANES;
    for (long c = c0; c < c1; c++) memset(dst + c * width + tokens, 0, (width - tokens) * sizeof(float));
    for (long t = 0; t < full_t; t += LANES)
        for (long c = c0; c < full_c; c += LANES)
            transpose_block(src + t * cols + c, cols, dst + c * width + t, width);
    for (long c = full_c; c < c1; c++)
        for (long t = 0; t < full_t; t++) dst[c * width + t] = src[t * cols + c];
    for (long c = c0; c < c1; c++)
        for (long t = full_t; t < tokens; t++) dst[c * width + t] = src[t * cols + c];
}

/* The whole value gradient in one call, on `threads` threads of the OpenMP runtime this library is
 * linked to (in a process that imported torch first, torch's own: the same workers that just ran its
 * products, still spinning, take the work at once; no second pool competes with them for the cores).
 * Phase 1: the transposes of g and (unless x_ready) x, by blocks of TRANSPOSE_COLUMNS columns, g's
 * and x's blocks in one list; phase 2: the dots, by chunks of DOT_CHUNK positions. Both phases deal
 * their pieces out one at a time (schedule dynamic), so a thread slowed by another process on its
 * core takes fewer of them; each value is one thread's dot, so the results do not depend on the
 * split. g_rows/x_rows: m (n) rows of width floats; g_ready/x_ready: already transposed there. */
#define TRANSPOSE_COLUMNS 64
#define DOT_CHUNK 2048
#define VALUE_GRAD(NAME, DOTS, INDEX)                                                              \
    void NAME(const float *g, float *g_rows, long m, int g_ready, const float *x, float *x_rows,    \
              long n, int x_ready, long tokens, long width, const INDEX *ia, const INDEX *ib,       \
              float *out, long count, long threads) {                                              \
        long gb = g_ready ? 0 : (m + TRANSPOSE_COLUMNS - 1) / TRANSPOSE_COLUMNS;                   \
        long xb = x_ready ? 0 : (n + TRANSPOSE_COLUMNS - 1) / TRANSPOSE_COLUMNS;                   \
        long chunks = (count + DOT_CHUNK - 1) / DOT_CHUNK;                                         \
        _Pragma("omp parallel num_threads(threads) if (threads > 1)")                               \
        {                                                                                          \
            _Pragma("omp for schedule(dynamic, 1)")                                                \
            for (long b = 0; b < gb + xb; b++) {                                                   \
                long c0 = (b < gb ? b : b - gb) * TRANSPOSE_COLUMNS, cols = b < gb ? m : n;        \
                long c1 = c0 + TRANSPOSE_COLUMNS < cols ? c0 + TRANSPOSE_COLUMNS : cols;           \
                if (b < gb) shirakit_transpose_f32(g, tokens, m, g_rows, width, c0, c1);           \
                else shirakit_transpose_f32(x, tokens, n, x_rows, width, c0, c1);                  \
            }                                                                                      \
            _Pragma("omp for schedule(dynamic, 1)")                                                \
            for (long c = 0; c < chunks; c++) {                                                    \
                long k1 = (c + 1) * DOT_CHUNK < count ? (c + 1) * DOT_CHUNK : count;               \
                DOTS(g_rows, x_rows, ia, ib, out, width, c * DOT_CHUNK, k1);                       \
            }                                                                                      \
        }                                                                                          \
    }
VALUE_GRAD(shirakit_value_grad_i64, shirakit_dots_i64, int64_t)
VALUE_GRAD(shirakit_value_grad_i32, shirakit_dots_i32, int32_t)

/* How many threads the OpenMP runtime would use (0 when built without OpenMP): a probe. */
#ifdef _OPENMP
#include <omp.h>
long shirakit_openmp_threads(void) { return omp_get_max_threads(); }
#else
long shirakit_openmp_threads(void) { return 0; }
#endif

/* Fused switching across many layers in one call (see ShiraAdapter.scatter_many): for each layer l
 * of n, weight_l[index_l[k]] = values_l[k] for k < counts[l], as bit copies of `size`-byte elements
 * (any dtype of that width). Pointers come as int64 addresses. A UNet's ~130 small layers then
 * cost one call instead of one torch op (and its dispatch) per layer. */
#define SCATTER_MANY(T)                                                          \
    for (long l = 0; l < n; l++) {                                               \
        T *w = (T *)(intptr_t)weights[l];                                        \
        const T *v = (const T *)(intptr_t)values[l];                             \
        const int64_t *ix = (const int64_t *)(intptr_t)indices[l];               \
        for (int64_t k = 0; k < counts[l]; k++) w[ix[k]] = v[k];                 \
    }

void shirakit_scatter_many(long n, const int64_t *weights, const int64_t *indices, const int64_t *values,
                           const int64_t *counts, long size) {
    if (size == 4) { SCATTER_MANY(uint32_t) }
    else if (size == 2) { SCATTER_MANY(uint16_t) }
    else if (size == 8) { SCATTER_MANY(uint64_t) }
    else { SCATTER_MANY(uint8_t) }
}
