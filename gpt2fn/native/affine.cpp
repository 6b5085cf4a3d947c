// Few-row products over the matrices as they are stored: no copy, no layout of our own (gpt2fn.kernels).
//
//   gpt2fn_affine    y = x @ W + b   W [K, N] row-major (the [in, out] orientation of every GPT-2 matrix)
//   gpt2fn_affine_t  y = x @ E^T     E [N, K] row-major (the tied head: the token embedding [vocab, d_model])
//
// Built on first use by gpt2fn/native with the machine's C++ compiler (-O3 -march=native -fopenmp) and called
// through ctypes; every caller has a torch fallback. OpenMP resolves to the libgomp torch loaded, so these
// threads are torch's threads.
//
// gpt2fn_affine: each thread owns a contiguous range of columns, cut into bands of up to 3 vectors. K is walked
// in chunks of KC rows; within a chunk the thread visits its bands left to right, so each of the KC rows is read
// front to back as one stream (the hardware prefetcher follows KC streams). A band keeps a block of up to 8 rows
// x 3 vectors of accumulators in registers for the chunk (one weight load feeds 8 multiply-adds) and parks them
// in y between chunks. Rows past one block reuse the chunk's band from L1.
//
// gpt2fn_affine_t: each thread owns a contiguous range of E's rows (output columns); G of them at a time are
// dotted with a block of R input rows, G*R vector accumulators, reduced once at the end. Every E row is read once
// per block of R input rows, front to back.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <omp.h>

#if defined(__AVX512F__)
constexpr int VL = 16, NREG = 32;
#elif defined(__AVX__)
constexpr int VL = 8, NREG = 16;
#else
constexpr int VL = 4, NREG = 16;
#endif
typedef float vf __attribute__((vector_size(VL * 4), aligned(4)));

static inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
static inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
static inline vf splat(float s) { return vf{} + s; }

// Rows per register block with NV vectors per row: R*NV accumulators + NV weights + 1 broadcast <= NREG.
#ifndef PD
#define PD 16
#endif
constexpr int rmax(int nv) { return std::min(8, std::max(1, (NREG - 1 - nv) / nv)); }

// acc[r][j] over k in [0, k_len): y[r, j*VL..] (+)= sum_k x[r, k] * w[k, j*VL..]
template <int R, int NV>
static inline void band(const float* __restrict x, int64_t ldx, const float* __restrict w, int64_t ldw,
                        int64_t k_len, const float* __restrict b, float* __restrict y, int64_t ldy, bool first) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j)
      acc[r][j] = !first ? load(y + r * ldy + j * VL) : (b ? load(b + j * VL) : vf{});
  for (int64_t k = 0; k < k_len; ++k) {
    vf wv[NV];
    const float* wk = w + k * ldw;
    if (PD > 0 && k + PD < k_len)
      for (int j = 0; j < NV; ++j) __builtin_prefetch(wk + PD * ldw + j * VL);
    for (int j = 0; j < NV; ++j) wv[j] = load(wk + j * VL);
    for (int r = 0; r < R; ++r) {
      const vf xs = splat(x[r * ldx + k]);
      for (int j = 0; j < NV; ++j) acc[r][j] += xs * wv[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) store(y + r * ldy + j * VL, acc[r][j]);
}

// One band of NV vectors for every row block, over one chunk of K.
template <int NV>
static inline void band_rows(const float* x, int64_t rows, int64_t ldx, const float* w, int64_t ldw, int64_t k_len,
                             const float* b, float* y, int64_t ldy, bool first) {
  constexpr int R = rmax(NV);
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    const float* xr = x + r0 * ldx;
    float* yr = y + r0 * ldy;
    switch (std::min<int64_t>(R, rows - r0)) {
#define GPT2FN_CASE(n) \
  case n: if constexpr (n <= R) band<n, NV>(xr, ldx, w, ldw, k_len, b, yr, ldy, first); break;
      GPT2FN_CASE(1) GPT2FN_CASE(2) GPT2FN_CASE(3) GPT2FN_CASE(4)
      GPT2FN_CASE(5) GPT2FN_CASE(6) GPT2FN_CASE(7) GPT2FN_CASE(8)
#undef GPT2FN_CASE
    }
  }
}

// Columns [c0, c0 + nvec * VL) of y for every row, K in chunks of kc rows.
static void columns(const float* x, int64_t rows, int64_t K, int64_t ldx, const float* w, int64_t ldw,
                    const float* b, float* y, int64_t ldy, int64_t c0, int64_t nvec, int64_t kc) {
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t kl = std::min(kc, K - k0);
    const bool first = k0 == 0;
    const float* xk = x + k0;
    const float* wk = w + k0 * ldw;
    int64_t v = 0;
    for (; v + 3 <= nvec; v += 3) {
      const int64_t c = c0 + v * VL;
      band_rows<3>(xk, rows, ldx, wk + c, ldw, kl, b ? b + c : nullptr, y + c, ldy, first);
    }
    const int64_t c = c0 + v * VL;
    switch (nvec - v) {
      case 2: band_rows<2>(xk, rows, ldx, wk + c, ldw, kl, b ? b + c : nullptr, y + c, ldy, first); break;
      case 1: band_rows<1>(xk, rows, ldx, wk + c, ldw, kl, b ? b + c : nullptr, y + c, ldy, first); break;
      default: break;
    }
  }
}

// The last N % VL columns, one at a time (a vocabulary of 50257 leaves one).
static void tail_columns(const float* x, int64_t rows, int64_t K, int64_t ldx, const float* w, int64_t ldw,
                         const float* b, float* y, int64_t ldy, int64_t c0, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = c0; c < c0 + n; ++c) {
      float s = b ? b[c] : 0.0f;
      for (int64_t k = 0; k < K; ++k) s += x[r * ldx + k] * w[k * ldw + c];
      y[r * ldy + c] = s;
    }
}

template <int G, int R>
static inline void dots(const float* __restrict x, int64_t ldx, const float* __restrict e, int64_t lde, int64_t K,
                        float* __restrict y, int64_t ldy) {
  vf acc[G][R];
  for (int g = 0; g < G; ++g)
    for (int r = 0; r < R; ++r) acc[g][r] = vf{};
  const int64_t kv = K / VL * VL;
  for (int64_t k = 0; k < kv; k += VL) {
    vf ev[G];
    for (int g = 0; g < G; ++g) ev[g] = load(e + g * lde + k);
    for (int r = 0; r < R; ++r) {
      const vf xv = load(x + r * ldx + k);
      for (int g = 0; g < G; ++g) acc[g][r] += ev[g] * xv;
    }
  }
  for (int g = 0; g < G; ++g)
    for (int r = 0; r < R; ++r) {
      float s = 0.0f;
      for (int i = 0; i < VL; ++i) s += acc[g][r][i];
      for (int64_t k = kv; k < K; ++k) s += e[g * lde + k] * x[r * ldx + k];
      y[r * ldy + g] = s;
    }
}

template <int G, int R>
static void dot_rows(const float* x, int64_t rows, int64_t ldx, const float* e, int64_t lde, int64_t K, float* y,
                     int64_t ldy) {
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    const float* xr = x + r0 * ldx;
    float* yr = y + r0 * ldy;
    switch (std::min<int64_t>(R, rows - r0)) {
#define GPT2FN_CASE(n) \
  case n: if constexpr (n <= R) dots<G, n>(xr, ldx, e, lde, K, yr, ldy); break;
      GPT2FN_CASE(1) GPT2FN_CASE(2) GPT2FN_CASE(3) GPT2FN_CASE(4) GPT2FN_CASE(5) GPT2FN_CASE(6)
#undef GPT2FN_CASE
    }
  }
}

// Output columns [n0, n1) of y = x @ E^T.
static void dot_columns(const float* x, int64_t rows, int64_t K, int64_t ldx, const float* e, int64_t lde, float* y,
                        int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int RB = NREG >= 32 ? 6 : 2;  // 4*RB accumulators + 4 rows of E + 1 input vector
  int64_t n = n0;
  if (rows == 1) {
    for (; n + 8 <= n1; n += 8) dots<8, 1>(x, ldx, e + n * lde, lde, K, y + n, ldy);
  } else {
    for (; n + 4 <= n1; n += 4) dot_rows<4, RB>(x, rows, ldx, e + n * lde, lde, K, y + n, ldy);
  }
  for (; n < n1; ++n) dot_rows<1, RB>(x, rows, ldx, e + n * lde, lde, K, y + n, ldy);
}

extern "C" {

// The vector width in floats.
int gpt2fn_vector_width(void) { return VL; }

// y [rows, N] (row stride ldy) = x [rows, K] (row stride ldx) @ W [K, N] (row stride ldw) + b; b may be null.
// kc: rows of W per chunk (0: the default). Returns 0.
int gpt2fn_affine(const float* x, int64_t rows, int64_t K, int64_t ldx, const float* w, int64_t N, int64_t ldw,
                  const float* b, float* y, int64_t ldy, int threads, int64_t kc) {
  if (kc <= 0) kc = 16;
  const int64_t nvec = N / VL, tail = N - nvec * VL;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, nvec)));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t v0 = nvec * t / T, v1 = nvec * (t + 1) / T;
    if (v1 > v0) columns(x, rows, K, ldx, w, ldw, b, y, ldy, v0 * VL, v1 - v0, kc);
    if (t == T - 1 && tail) tail_columns(x, rows, K, ldx, w, ldw, b, y, ldy, nvec * VL, tail);
  }
  return 0;
}

// y [rows, N] (row stride ldy) = x [rows, K] (row stride ldx) @ E^T, E [N, K] (row stride lde). Returns 0.
int gpt2fn_affine_t(const float* x, int64_t rows, int64_t K, int64_t ldx, const float* e, int64_t N, int64_t lde,
                    float* y, int64_t ldy, int threads) {
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, N / 8)));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    dot_columns(x, rows, K, ldx, e, lde, y, ldy, N * t / T, N * (t + 1) / T);
  }
  return 0;
}
}
