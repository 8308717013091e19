/* The decode rows' sparse deltas on CPU: y[r, :] += Δ_t · x[r, :] for every row r whose adapter is t, each
 * adapter's CSR read once per step for up to 16 of its rows. Built by server/sparse_kernel.py with the system
 * C compiler and OpenMP; the OpenMP runtime is the one torch has already loaded (same soname), so the kernel
 * shares torch's thread pool instead of starting a second one.
 *
 * Why a kernel of its own: through torch, the same product is an index_put of the rows' inputs into a
 * (T·d_in, K) matrix, MKL's CSR SpMM over a block-diagonal table, a gather of the outputs and an index_add:
 * about 100 µs per projection group (q/k/v of SmolLM2) at 16 rows over 8 adapters in a decode step. This
 * kernel takes about 55 µs there, and about 32 µs when the deltas are in cache; the difference is reading
 * them from memory (about 1 MB per group), which neither prefetching ahead nor 16-bit column indices
 * shortened, measured. The inner loops keep four partial sums per row: with one chain of dependent
 * multiply-adds per row, the loop was bound by the FMA latency.
 */
#include <omp.h>
#include <stdint.h>

typedef struct {
  const int32_t *crow; /* (d_out + 1,) */
  const int32_t *col;  /* (nnz,) */
  const void *val;     /* (nnz,) fp32, or bf16 as uint16_t when bf16 is set */
  int64_t bf16;
} csr_t;

/* A bf16 value is the upper half of the fp32 with the same sign and exponent: widening is a shift. */
static inline float bf16_to_f32(uint16_t h) {
  union { uint32_t u; float f; } v;
  v.u = (uint32_t)h << 16;
  return v.f;
}
#define VAL_F32(v, j) (((const float *)(v))[j])
#define VAL_BF16(v, j) bf16_to_f32(((const uint16_t *)(v))[j])

/* For output rows o in [o0, o1) of one adapter's CSR: y_k[o] += Σ_j val[j] · p[col[j]·NR + k] for the nr ≤ NR
 * rows interleaved in p (a chunk is padded with zero rows to the next of 1, 2, 4, 8, 16). The NR inputs of a
 * column are one short
 * vector (GCC/Clang vector extensions: SSE or NEON on any target), so a non-zero costs one multiply-add for
 * all of them, and each row keeps four partial sums: with one chain of dependent multiply-adds the loop was
 * bound by the FMA latency. One copy per value type (VAL: how entry j of val is read as fp32). */
#define SPAN(NAME, NR, VT, VAL)                                                                       \
  static void NAME(const int32_t *restrict crow, const int32_t *restrict col, const void *restrict val, \
                   int64_t o0, int64_t o1, const float *restrict p, float *const *yk, int nr) {       \
    for (int64_t o = o0; o < o1; o++) {                                                               \
      const int32_t b = crow[o], e = crow[o + 1];                                                     \
      if (b == e) continue;                                                                           \
      VT s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};                                                      \
      int32_t j = b;                                                                                  \
      for (; j + 4 <= e; j += 4) {                                                                    \
        s0 += VAL(val, j) * *(const VT *)(p + (int64_t)col[j] * NR);                                  \
        s1 += VAL(val, j + 1) * *(const VT *)(p + (int64_t)col[j + 1] * NR);                          \
        s2 += VAL(val, j + 2) * *(const VT *)(p + (int64_t)col[j + 2] * NR);                          \
        s3 += VAL(val, j + 3) * *(const VT *)(p + (int64_t)col[j + 3] * NR);                          \
      }                                                                                               \
      for (; j < e; j++) s0 += VAL(val, j) * *(const VT *)(p + (int64_t)col[j] * NR);                 \
      const VT sum = (s0 + s1) + (s2 + s3);                                                           \
      for (int k = 0; k < nr; k++) yk[k][o] += sum[k];                                                \
    }                                                                                                 \
  }
typedef float v1f __attribute__((vector_size(sizeof(float)), aligned(sizeof(float))));
typedef float v2f __attribute__((vector_size(2 * sizeof(float)), aligned(sizeof(float))));
typedef float v4f __attribute__((vector_size(4 * sizeof(float)), aligned(sizeof(float))));
typedef float v8f __attribute__((vector_size(8 * sizeof(float)), aligned(sizeof(float))));
typedef float v16f __attribute__((vector_size(16 * sizeof(float)), aligned(sizeof(float))));
SPAN(span2_f32, 2, v2f, VAL_F32)
SPAN(span4_f32, 4, v4f, VAL_F32)
SPAN(span8_f32, 8, v8f, VAL_F32)
SPAN(span16_f32, 16, v16f, VAL_F32)
SPAN(span2_bf16, 2, v2f, VAL_BF16)
SPAN(span4_bf16, 4, v4f, VAL_BF16)
SPAN(span8_bf16, 8, v8f, VAL_BF16)
SPAN(span16_bf16, 16, v16f, VAL_BF16)
#ifndef __AVX512F__
SPAN(span1_f32, 1, v1f, VAL_F32)
SPAN(span1_bf16, 1, v1f, VAL_BF16)
#else
/* One row with AVX-512: 16 non-zeros at a time, a masked load of their column indices and values, one gather
 * of the inputs, one multiply-add. In a decode step of 8 rows over 8 adapters (data coming from memory) this
 * took the deltas from 2.4 to 1.9 ms, although it is slower than the portable loop when the deltas are in
 * cache (40 against 32 µs per layer group). The same gather for two rows (pairs of inputs as 64-bit elements) was
 * no faster in a decode step and nearly twice as slow in cache, so two rows keep the vector code above.
 * bf16 values are widened in the register: 16 of them zero-extended to 32 bits and shifted into place. */
#include <immintrin.h>
#define SPAN1_AVX512(NAME, LOADV)                                                                     \
  static void NAME(const int32_t *restrict crow, const int32_t *restrict col, const void *restrict val, \
                   int64_t o0, int64_t o1, const float *restrict p, float *const *yk, int nr) {       \
    (void)nr; /* always 1 */                                                                          \
    for (int64_t o = o0; o < o1; o++) {                                                               \
      const int32_t b = crow[o], e = crow[o + 1];                                                     \
      if (b == e) continue;                                                                           \
      __m512 acc = _mm512_setzero_ps();                                                               \
      for (int32_t j = b; j < e; j += 16) {                                                           \
        const int32_t left = e - j;                                                                   \
        const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);           \
        const __m512i c = _mm512_maskz_loadu_epi32(m, col + j);                                       \
        const __m512 v = LOADV(m, val, j);                                                            \
        acc = _mm512_fmadd_ps(v, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, c, p, 4), acc);     \
      }                                                                                               \
      yk[0][o] += _mm512_reduce_add_ps(acc);                                                          \
    }                                                                                                 \
  }
#define LOAD16_F32(m, v, j) _mm512_maskz_loadu_ps(m, (const float *)(v) + (j))
#define LOAD16_BF16(m, v, j)                                                                          \
  _mm512_castsi512_ps(_mm512_slli_epi32(                                                              \
      _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)(v) + (j))), 16))
SPAN1_AVX512(span1_f32, LOAD16_F32)
SPAN1_AVX512(span1_bf16, LOAD16_BF16)
#endif

typedef void (*span_fn)(const int32_t *, const int32_t *, const void *, int64_t, int64_t, const float *,
                        float *const *, int);
static const span_fn SPANS[2][5] = {{span1_f32, span2_f32, span4_f32, span8_f32, span16_f32},
                                    {span1_bf16, span2_bf16, span4_bf16, span8_bf16, span16_bf16}};

/* A chunk is up to CHUNK rows of one adapter, interleaved in a width of the next power of two: one pass over
 * the adapter's delta serves them all (a chain of tasks puts many rows under its first adapters; with chunks
 * of 4 rather than 16, an 8-task chain at 32 rows cost the decode step twice as much). A chunk takes at most PAD
 * rows of padding, so adapter t's chunks start at xp + (row_start[t] + PAD·t)·d_in. */
#define CHUNK 16
#define PAD 7
static inline int width_of(int nr) { return nr <= 1 ? 1 : nr <= 2 ? 2 : nr <= 4 ? 4 : nr <= 8 ? 8 : 16; }
static inline int span_of(int width) { return width == 1 ? 0 : width == 2 ? 1 : width == 4 ? 2 : width == 8 ? 3 : 4; }

/* n_adapters CSR deltas of shape (d_out, d_in); the rows of adapter t are rows[row_start[t]:row_start[t+1]].
 * A row may be listed under several adapters (a route of several deltas): each adds its product.
 * x: (n, xs) fp32, a row's input in its first d_in entries; y: (n, ys) fp32, its output in the first d_out.
 * xp: scratch of (row_start[n_adapters] + PAD · n_adapters) · d_in floats. */
void jumplora_sparse_delta_add(int64_t n_adapters, const csr_t *adapters, const int32_t *row_start,
                               const int32_t *rows, int64_t d_in, int64_t d_out, const float *x, int64_t xs,
                               float *y, int64_t ys, float *xp, int32_t n_threads) {
  /* The d_out output rows are split evenly between the threads; each thread walks every adapter over its own
   * stretch of them. So each y[r, o] is written by one thread only, however many adapters row r has. */
#pragma omp parallel num_threads(n_threads)
  {
    /* First each chunk's inputs are interleaved, (d_in, width), so that one column index fetches all of them;
     * padding rows are zeros. */
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_adapters; t++)
      for (int32_t r0 = row_start[t]; r0 < row_start[t + 1]; r0 += CHUNK) {
        const int32_t left = row_start[t + 1] - r0, nr = left < CHUNK ? left : CHUNK, width = width_of(nr);
        float *dst = xp + (r0 + PAD * t) * d_in;
        for (int k = 0; k < nr; k++) {
          const float *src = x + (int64_t)rows[r0 + k] * xs;
          for (int64_t c = 0; c < d_in; c++) dst[c * width + k] = src[c];
        }
        for (int k = nr; k < width; k++)
          for (int64_t c = 0; c < d_in; c++) dst[c * width + k] = 0.f;
      } /* (the implied barrier: every chunk is packed before any is read) */
    const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t o0 = d_out * id / nt, o1 = d_out * (id + 1) / nt;
    for (int64_t t = 0; t < n_adapters && o0 < o1; t++) {
      const csr_t a = adapters[t];
      const span_fn *spans = SPANS[a.bf16 != 0];
      for (int32_t r0 = row_start[t]; r0 < row_start[t + 1]; r0 += CHUNK) {
        const int32_t left = row_start[t + 1] - r0, nr = left < CHUNK ? left : CHUNK;
        float *yk[CHUNK];
        for (int k = 0; k < nr; k++) yk[k] = y + (int64_t)rows[r0 + k] * ys;
        spans[span_of(width_of(nr))](a.crow, a.col, a.val, o0, o1, xp + (r0 + PAD * t) * d_in, yk, nr);
      }
    }
  }
}
