/* The rows' sparse deltas on CPU: y[r, :] += Σ_t Δ_t · x[r, :] over the adapters t of row r's route. Built by
 * server/sparse_kernel.py with the system C compiler and OpenMP; the OpenMP runtime is the one torch has
 * already loaded (same soname), so the kernel shares torch's thread pool instead of starting a second one.
 *
 * Layout (made by sparse_kernel.py's ``layout``): the rows are cut into blocks of up to 32, rows with the same
 * or similar routes side by side. A block lists its entries: an adapter and the mask of the block's rows whose
 * route holds it. A block's inputs are interleaved, (d_in, W) with W the next power of two of its rows, so
 * that one column index fetches all of them as one short vector: each entry's delta is read once for the
 * whole block, one multiply-add a non-zero for all W rows, and the lanes of rows outside the entry's mask are
 * cleared from its sums. The sums of all the block's entries gather in a (d_out, W) scratch, written to y once
 * at the end of the block. An entry of a single row takes the row's input straight from x instead (with a
 * gather on AVX-512): a W-lane multiply-add for one row would waste the other lanes.
 *
 * Each entry runs over its stored rows on its own (not all entries per output row): the delta is then read as
 * one sequential stream, and the value and column types are dispatched once an entry. As served (made by
 * sparse_kernel.py's ``kernel_rows``) a delta's rows hold multiples of 4 non-zeros (zero values pad them), and
 * within each chunk of 64 rows they are stored by length, perm giving each stored row's output row: the inner
 * loop then has no remainder and its trip count repeats from row to row, where a row of ~20 non-zeros used to
 * end with a mispredicted branch or two. The threads split the output rows at whole chunks (a stored row
 * writes an output row of its own chunk), so that each has about the same number of non-zeros (q and v
 * adapted, k not: an even split of the rows is not one of the work). An entry over more than NATIVE lanes of a
 * block (16; 8 with SSE) runs each chunk of rows once per NATIVE lanes that hold its rows: the block's inputs (d_in
 * x 128 bytes, 72 KB for d_in 576) do not fit in L1, 16 lanes' do. Figures: server/sparse_kernel.py. Tried and left
 * out, measured on the 8-task chain: software prefetching of the non-zeros once every 16 in the entries of several
 * rows, 512 to 8192 ahead (within the run-to-run noise; once a row, 256 ahead, it helps: ROW_PREFETCH), bf16 values
 * with 16-bit columns (4 bytes a non-zero instead of 6: no faster, the widening costs what the bytes save), rows
 * padded to 8 with the loop unrolled 8 times, and the column and value of a non-zero side by side in one stream
 * (neither faster). */
#include <omp.h>
#include <stdint.h>

typedef struct {
  const int32_t *crow; /* (d_out + 1,) the stored rows' non-zeros */
  const void *col;     /* (nnz,) int32, or uint16 when kind has COL16 */
  const void *val;     /* (nnz,) fp32, or bf16 as uint16 when kind has BF16 */
  const int32_t *perm; /* (d_out,) stored row o is output row perm[o], a row of o's chunk; NULL: perm[o] = o */
  int64_t kind;        /* BF16 | COL16 */
} csr_t;
#define OUT(a, o) ((a)->perm ? (int64_t)(a)->perm[o] : (o))
#define BF16 1
#define COL16 2

/* A bf16 value is the upper half of the fp32 with the same sign and exponent: widening is a shift. */
static inline float bf16_to_f32(uint16_t h) {
  union { uint32_t u; float f; } v;
  v.u = (uint32_t)h << 16;
  return v.f;
}
#define VAL_F32(v, j) (((const float *)(v))[j])
#define VAL_BF16(v, j) bf16_to_f32(((const uint16_t *)(v))[j])
#define COL_I32(c, j) ((int64_t)((const int32_t *)(c))[j])
#define COL_U16(c, j) ((int64_t)((const uint16_t *)(c))[j])

/* The deltas are read as streams from memory (a decode step's base weights evict them from the caches); the
 * values and columns AHEAD non-zeros on are prefetched, once every 16 non-zeros of one row (PREFETCH) or at the
 * start of every stored row of several (ROW_PREFETCH: two lines of values, one of columns, a row holding about
 * 20 non-zeros). A prefetch past the end of an array is harmless. */
#define AHEAD 256
#define PREFETCH(col, val, j, VAL_BYTES, COL_BYTES)                                                    \
  __builtin_prefetch((const char *)(val) + (VAL_BYTES) * ((j) + AHEAD));                               \
  __builtin_prefetch((const char *)(col) + (COL_BYTES) * ((j) + AHEAD));
#define ROW_PREFETCH(col, val, j, VAL_BYTES, COL_BYTES)                                                \
  PREFETCH(col, val, j, VAL_BYTES, COL_BYTES)                                                          \
  __builtin_prefetch((const char *)(val) + (VAL_BYTES) * ((j) + AHEAD) + 64);

/* One entry over lanes [lo, lo + V) of a block of 2^sh lanes: yp[perm[o], lo + k] += Σ_j val[j] · p[col[j], lo + k]
 * over the non-zeros j of every stored row o in [o0, o1), the V lanes at once, the lanes outside mask m cleared
 * bitwise (whatever they hold stays out). p: (d_in, 2^sh) and yp: (d_out, 2^sh). The V lanes are N vectors of
 * the type HT (GCC/Clang vector extensions: SSE, AVX or NEON on any target), none wider than the CPU's own:
 * a 16-lane vector type on a CPU without AVX-512 compiles to code that goes through the stack, 5 times slower
 * than two 8-lane vectors (AMD EPYC, AVX2; ad hoc). Four partial sums: with one chain of dependent
 * multiply-adds the loop is bound by the FMA latency. One copy per width, value and column type. */
#define ENTRY(NAME, V, HT, HI, N, VAL, COL, VB, CB, WHOLE_BLOCK)                                       \
  static void NAME(const csr_t *a, uint32_t m, int64_t o0, int64_t o1, const float *restrict p,        \
                   float *restrict yp, int sh_, int lo_) {                                             \
    enum { HV = V / N }; /* lanes in one of the N vectors */                                          \
    /* a window as wide as the block: its shift a constant, as in the inner loop's address arithmetic */  \
    const int sh = WHOLE_BLOCK ? __builtin_ctz(V) : sh_, lo = WHOLE_BLOCK ? 0 : lo_;                  \
    const int32_t *restrict crow = a->crow;                                                            \
    const void *restrict col = a->col, *restrict val = a->val;                                         \
    HI keep[N];                                                                                        \
    for (int h = 0; h < N; h++)                                                                        \
      for (int k = 0; k < HV; k++) keep[h][k] = (m >> (lo + h * HV + k)) & 1u ? -1 : 0;                \
    const uint32_t full = (1u << V) - 1; /* the window's lanes (V ≤ 16) */                             \
    const int whole = ((m >> lo) & full) == full;                                                      \
    p += lo;                                                                                           \
    for (int64_t o = o0; o < o1; o++) {                                                                \
      const int32_t b = crow[o], e = crow[o + 1];                                                      \
      if (b == e) continue;                                                                            \
      ROW_PREFETCH(col, val, b, VB, CB)                                                                \
      HT s0[N], s1[N], s2[N], s3[N];                                                                   \
      for (int h = 0; h < N; h++) s0[h] = s1[h] = s2[h] = s3[h] = (HT){0};                             \
      int32_t j = b;                                                                                   \
      for (; j + 4 <= e; j += 4) {                                                                     \
        const float *q0 = p + (COL(col, j) << sh), *q1 = p + (COL(col, j + 1) << sh);                  \
        const float *q2 = p + (COL(col, j + 2) << sh), *q3 = p + (COL(col, j + 3) << sh);              \
        const float v0 = VAL(val, j), v1 = VAL(val, j + 1), v2 = VAL(val, j + 2), v3 = VAL(val, j + 3); \
        for (int h = 0; h < N; h++) {                                                                  \
          s0[h] += v0 * *(const HT *)(q0 + h * HV);                                                    \
          s1[h] += v1 * *(const HT *)(q1 + h * HV);                                                    \
          s2[h] += v2 * *(const HT *)(q2 + h * HV);                                                    \
          s3[h] += v3 * *(const HT *)(q3 + h * HV);                                                    \
        }                                                                                              \
      }                                                                                                \
      for (; j < e; j++) {                                                                             \
        const float *q0 = p + (COL(col, j) << sh), v0 = VAL(val, j);                                   \
        for (int h = 0; h < N; h++) s0[h] += v0 * *(const HT *)(q0 + h * HV);                         \
      }                                                                                                \
      HT *out = (HT *)(yp + (OUT(a, o) << sh) + lo);                                                   \
      for (int h = 0; h < N; h++) {                                                                    \
        const HT s = (s0[h] + s1[h]) + (s2[h] + s3[h]);                                                \
        out[h] += whole ? s : (HT)((HI)s & keep[h]);                                                   \
      }                                                                                                \
    }                                                                                                  \
  }
#define ENTRIES(V, HT, HI, N)                                                                          \
  ENTRY(entry##V##_f32_i32, V, HT, HI, N, VAL_F32, COL_I32, 4, 4, 0)                                   \
  ENTRY(entry##V##_bf16_i32, V, HT, HI, N, VAL_BF16, COL_I32, 2, 4, 0)                                 \
  ENTRY(entry##V##_f32_u16, V, HT, HI, N, VAL_F32, COL_U16, 4, 2, 0)                                   \
  ENTRY(entry##V##_bf16_u16, V, HT, HI, N, VAL_BF16, COL_U16, 2, 2, 0)                                 \
  ENTRY(whole##V##_f32_i32, V, HT, HI, N, VAL_F32, COL_I32, 4, 4, 1)                                   \
  ENTRY(whole##V##_bf16_i32, V, HT, HI, N, VAL_BF16, COL_I32, 2, 4, 1)                                 \
  ENTRY(whole##V##_f32_u16, V, HT, HI, N, VAL_F32, COL_U16, 4, 2, 1)                                   \
  ENTRY(whole##V##_bf16_u16, V, HT, HI, N, VAL_BF16, COL_U16, 2, 2, 1)
typedef float v2f __attribute__((vector_size(2 * sizeof(float)), aligned(sizeof(float))));
typedef float v4f __attribute__((vector_size(4 * sizeof(float)), aligned(sizeof(float))));
typedef float v8f __attribute__((vector_size(8 * sizeof(float)), aligned(sizeof(float))));
typedef float v16f __attribute__((vector_size(16 * sizeof(float)), aligned(sizeof(float))));
typedef int32_t v2i __attribute__((vector_size(2 * sizeof(int32_t))));
typedef int32_t v4i __attribute__((vector_size(4 * sizeof(int32_t))));
typedef int32_t v8i __attribute__((vector_size(8 * sizeof(int32_t))));
typedef int32_t v16i __attribute__((vector_size(16 * sizeof(int32_t))));
ENTRIES(2, v2f, v2i, 1)
ENTRIES(4, v4f, v4i, 1)
#if defined(__AVX512F__)
ENTRIES(8, v8f, v8i, 1)
ENTRIES(16, v16f, v16i, 1)
#elif defined(__AVX__)
ENTRIES(8, v8f, v8i, 1)
ENTRIES(16, v8f, v8i, 2)
#else /* 128-bit vectors (SSE, NEON) */
ENTRIES(8, v4f, v4i, 2)
ENTRIES(16, v4f, v4i, 4)
#endif

/* One row's sum over the non-zeros [b, e) of an output row: Σ_j val[j] · xr[col[j]], its input xr contiguous.
 * A single row's delta is little work per byte read, and its reads wait on memory: the values and columns
 * AHEAD non-zeros on are prefetched (PREFETCH; on the trained chain, one row on 8 adapters, 14 % less time). */
#ifndef __AVX512F__
#define DOT1(NAME, VAL, COL, VB, CB)                                                                   \
  static inline float NAME(const void *restrict col, const void *restrict val, int32_t b, int32_t e,   \
                           const float *restrict xr) {                                                 \
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;                                                      \
    int32_t j = b;                                                                                     \
    for (; j + 4 <= e; j += 4) {                                                                       \
      if ((j & 15) == 0) { PREFETCH(col, val, j, VB, CB) }                                             \
      s0 += VAL(val, j) * xr[COL(col, j)];                                                             \
      s1 += VAL(val, j + 1) * xr[COL(col, j + 1)];                                                     \
      s2 += VAL(val, j + 2) * xr[COL(col, j + 2)];                                                     \
      s3 += VAL(val, j + 3) * xr[COL(col, j + 3)];                                                     \
    }                                                                                                  \
    for (; j < e; j++) s0 += VAL(val, j) * xr[COL(col, j)];                                            \
    return (s0 + s1) + (s2 + s3);                                                                      \
  }
DOT1(dot1_f32_i32, VAL_F32, COL_I32, 4, 4)
DOT1(dot1_bf16_i32, VAL_BF16, COL_I32, 2, 4)
DOT1(dot1_f32_u16, VAL_F32, COL_U16, 4, 2)
DOT1(dot1_bf16_u16, VAL_BF16, COL_U16, 2, 2)
#else
/* With AVX-512: 16 non-zeros at a time, a masked load of their columns and values, one gather of the inputs,
 * one multiply-add. bf16 values and 16-bit columns are widened in the register (zero-extended; a bf16 value
 * then shifted into the upper half). */
#include <immintrin.h>
#define DOT1(NAME, LOADV, LOADC, VB, CB)                                                               \
  static inline float NAME(const void *restrict col, const void *restrict val, int32_t b, int32_t e,   \
                           const float *restrict xr) {                                                 \
    __m512 acc = _mm512_setzero_ps();                                                                  \
    for (int32_t j = b; j < e; j += 16) {                                                              \
      PREFETCH(col, val, j, VB, CB)                                                                    \
      const int32_t left = e - j;                                                                      \
      const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);              \
      const __m512 x = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, LOADC(m, col, j), xr, 4);      \
      acc = _mm512_fmadd_ps(LOADV(m, val, j), x, acc);                                                 \
    }                                                                                                  \
    return _mm512_reduce_add_ps(acc);                                                                  \
  }
#define LOADV_F32(m, v, j) _mm512_maskz_loadu_ps(m, (const float *)(v) + (j))
#define LOADV_BF16(m, v, j)                                                                            \
  _mm512_castsi512_ps(_mm512_slli_epi32(                                                               \
      _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)(v) + (j))), 16))
#define LOADC_I32(m, c, j) _mm512_maskz_loadu_epi32(m, (const int32_t *)(c) + (j))
#define LOADC_U16(m, c, j) _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)(c) + (j)))
DOT1(dot1_f32_i32, LOADV_F32, LOADC_I32, 4, 4)
DOT1(dot1_bf16_i32, LOADV_BF16, LOADC_I32, 2, 4)
DOT1(dot1_f32_u16, LOADV_F32, LOADC_U16, 4, 2)
DOT1(dot1_bf16_u16, LOADV_BF16, LOADC_U16, 2, 2)
#endif

/* An entry of one row: y[perm[o]] += that sum for every stored row o in [o0, o1), the row's output y contiguous. */
#define ROW(NAME, DOT)                                                                                 \
  static void NAME(const csr_t *a, int64_t o0, int64_t o1, const float *restrict xr, float *restrict y) { \
    const int32_t *restrict crow = a->crow;                                                            \
    for (int64_t o = o0; o < o1; o++)                                                                  \
      if (crow[o] != crow[o + 1]) y[OUT(a, o)] += DOT(a->col, a->val, crow[o], crow[o + 1], xr);      \
  }
ROW(row_f32_i32, dot1_f32_i32)
ROW(row_bf16_i32, dot1_bf16_i32)
ROW(row_f32_u16, dot1_f32_u16)
ROW(row_bf16_u16, dot1_bf16_u16)

/* By kind (BF16 | COL16), and for the entries by width 2, 4, 8, 16. */
typedef void (*row_fn)(const csr_t *, int64_t, int64_t, const float *, float *);
typedef void (*entry_fn)(const csr_t *, uint32_t, int64_t, int64_t, const float *, float *, int, int);
static const row_fn ROWS[4] = {row_f32_i32, row_bf16_i32, row_f32_u16, row_bf16_u16};
#define BY_KIND(P, V) {P##V##_f32_i32, P##V##_bf16_i32, P##V##_f32_u16, P##V##_bf16_u16}
/* [whole block][log2(width) - 1][kind] */
static const entry_fn ENTRY_FNS[2][4][4] = { /* (a window wider than NATIVE runs as several: run_block) */
    {BY_KIND(entry, 2), BY_KIND(entry, 4), BY_KIND(entry, 8), BY_KIND(entry, 16)},
    {BY_KIND(whole, 2), BY_KIND(whole, 4), BY_KIND(whole, 8), BY_KIND(whole, 16)}};

#define MAX_ROWS 32 /* rows in a block */
/* The widest window run in one pass: 16 lanes (one AVX-512 vector, two AVX ones, four NEON ones; 8 with SSE,
 * whose 16 registers hold the four partial sums of 8 lanes but not of 16). A wider window runs each chunk of
 * SPLIT_ROWS stored rows once per NATIVE lanes (with its rows' masks), windows without rows of the entry left
 * out: the part of the block's inputs a pass reads (d_in x NATIVE x 4 bytes, 36 KB at 16 lanes for d_in 576)
 * then stays in L1 next to the chunk's non-zeros, which the passes after the first read from L1. */
#ifndef NATIVE
#if defined(__AVX__) || defined(__aarch64__)
#define NATIVE 16
#else
#define NATIVE 8
#endif
#endif
#if NATIVE != 8 && NATIVE != 16
#error "NATIVE must be 8 or 16"
#endif
#define SPLIT_ROWS 64
static inline int width_of(int nr) { int w = 1; while (w < nr) w *= 2; return w; }
static inline int log2_of(int w) { return __builtin_ctz((unsigned)w); }
static inline int one_row(uint32_t m) { return (m & (m - 1)) == 0; }

/* Whether a block has an entry of two rows or more: only then are its inputs interleaved. */
static int interleaved(const uint32_t *ent_mask, int32_t e0, int32_t e1) {
  for (int32_t i = e0; i < e1; i++)
    if (!one_row(ent_mask[i])) return 1;
  return 0;
}

/* Output rows [o0, o1) (whole chunks: also the stored rows that write them) of one block of nr rows (xk[k],
 * yk[k]: row k's input and output), its n_ent entries; p: its interleaved inputs (d_in, width); yp: its
 * (d_out, width) sums. An entry of several rows runs over the narrowest aligned window of lanes that holds them
 * (a chain's later adapters serve the block's last rows). */
static void run_block(const csr_t *adapters, const int32_t *ent_adapter, const uint32_t *ent_mask, int32_t n_ent,
                      int64_t o0, int64_t o1, int nr, int width, const float *p, const float *const *xk,
                      float *const *yk, float *yp) {
  int summed = 0;
  for (int32_t i = 0; i < n_ent; i++) {
    const csr_t *a = adapters + ent_adapter[i];
    const uint32_t m = ent_mask[i];
    if (one_row(m)) {
      const int k = __builtin_ctz(m);
      ROWS[a->kind](a, o0, o1, xk[k], yk[k]);
      continue;
    }
    if (!summed)
      for (int64_t j = o0 * width; j < o1 * width; j++) yp[j] = 0.f;
    summed = 1;
    const int first = __builtin_ctz(m), last = 31 - __builtin_clz(m);
    int v = 2;
    while (first / v != last / v) v *= 2;
    if (v > NATIVE) { /* NATIVE lanes at a time, chunk by chunk; windows without rows of the entry skipped */
      const entry_fn part = ENTRY_FNS[0][log2_of(NATIVE) - 1][a->kind];
      const int w0 = first / NATIVE * NATIVE, w1 = last / NATIVE * NATIVE;
      for (int64_t c = o0; c < o1; c += SPLIT_ROWS) {
        const int64_t c1 = c + SPLIT_ROWS < o1 ? c + SPLIT_ROWS : o1;
        for (int lo = w0; lo <= w1; lo += NATIVE)
          if ((m >> lo) & ((1u << NATIVE) - 1)) part(a, m, c, c1, p, yp, log2_of(width), lo);
      }
      continue;
    }
    ENTRY_FNS[v == width][log2_of(v) - 1][a->kind](a, m, o0, o1, p, yp, log2_of(width), first / v * v);
  }
  if (summed)
    for (int64_t o = o0; o < o1; o++)
      for (int k = 0; k < nr; k++) yk[k][o] += yp[o * width + k];
}

/* The first output row of thread id of nt: the rows split so that each thread has about as many non-zeros
 * of all adapters (and rows, each of which costs a little) as the others, at a multiple of chunk (a stored row
 * writes an output row of its chunk: a thread that holds whole chunks writes only its own rows). */
static int64_t split(const csr_t *adapters, int64_t n_adapters, int64_t d_out, int64_t chunk, int64_t id,
                     int64_t nt) {
  if (id <= 0) return 0;
  if (id >= nt) return d_out;
  int64_t total = d_out;
  for (int64_t t = 0; t < n_adapters; t++) total += adapters[t].crow[d_out];
  const int64_t goal = total * id / nt;
  int64_t lo = 0, hi = (d_out + chunk - 1) / chunk; /* the first chunk c whose work before it reaches the goal */
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2, at = mid * chunk < d_out ? mid * chunk : d_out;
    int64_t before = at;
    for (int64_t t = 0; t < n_adapters; t++) before += adapters[t].crow[at];
    if (before < goal) lo = mid + 1;
    else hi = mid;
  }
  return lo * chunk < d_out ? lo * chunk : d_out;
}

/* adapters: (n_adapters,) CSR deltas of shape (d_out, d_in). Block b holds rows[block_start[b]:block_start[b+1]]
 * (at most 32; a row of x and y in one block at most) and the entries entry_start[b]:entry_start[b+1]: adapter
 * entry_adapter[i] for the block's rows in bit mask entry_mask[i] (bit k: the block's k-th row).
 * x: (n, xs) fp32, a row's input in its first d_in entries; y: (n, ys) fp32, its output in the first d_out.
 * xp: scratch of Σ_b width(b) · d_in floats; yp: of Σ_b width(b) · d_out floats. chunk: the adapters' stored
 * rows write output rows of their own chunk of that many rows (csr_t.perm; 1 for none). */
void jumplora_sparse_delta_add(const csr_t *adapters, int64_t n_adapters, int64_t n_blocks,
                               const int32_t *block_start, const int32_t *rows, const int32_t *entry_start,
                               const int32_t *entry_adapter, const uint32_t *entry_mask, int64_t d_in,
                               int64_t d_out, int64_t chunk, const float *x, int64_t xs, float *y, int64_t ys,
                               float *xp, float *yp, int32_t n_threads) {
#pragma omp parallel num_threads(n_threads)
  {
    /* First the blocks' inputs are interleaved, (d_in, W) each, padding lanes zero; the threads split the
     * columns. Which blocks need it is found once, not once a column. */
    char packs[n_blocks > 0 ? n_blocks : 1];
    for (int64_t b = 0; b < n_blocks; b++)
      packs[b] = width_of(block_start[b + 1] - block_start[b]) > 1 &&
                 interleaved(entry_mask, entry_start[b], entry_start[b + 1]);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < d_in; c++) {
      int64_t lanes = 0;
      for (int64_t b = 0; b < n_blocks; b++) {
        const int32_t r0 = block_start[b], nr = block_start[b + 1] - r0, width = width_of(nr);
        if (packs[b]) {
          float *dst = xp + lanes * d_in + c * width;
          for (int k = 0; k < nr; k++) dst[k] = x[(int64_t)rows[r0 + k] * xs + c];
          for (int k = nr; k < width; k++) dst[k] = 0.f;
        }
        lanes += width;
      }
    } /* (the implied barrier: every block is packed before any is read) */
    const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t o0 = split(adapters, n_adapters, d_out, chunk, id, nt);
    const int64_t o1 = split(adapters, n_adapters, d_out, chunk, id + 1, nt);
    int64_t lanes = 0;
    for (int64_t b = 0; b < n_blocks && o0 < o1; b++) {
      const int32_t r0 = block_start[b], nr = block_start[b + 1] - r0, width = width_of(nr);
      const float *xk[MAX_ROWS];
      float *yk[MAX_ROWS];
      for (int k = 0; k < nr; k++) {
        xk[k] = x + (int64_t)rows[r0 + k] * xs;
        yk[k] = y + (int64_t)rows[r0 + k] * ys;
      }
      const int32_t e0 = entry_start[b];
      run_block(adapters, entry_adapter + e0, entry_mask + e0, entry_start[b + 1] - e0, o0, o1, nr, width,
                xp + lanes * d_in, xk, yk, yp + lanes * d_out);
      lanes += width;
    }
  }
}
