// y = x @ W + b for a weight laid out in column panels: W [P, K, SW] holds columns p*SW .. p*SW+SW-1 of the
// [K, P*SW] matrix, each panel contiguous, so a thread streams its panels front to back (gpt2fn.kernels).
//
// Built on first use by gpt2fn/kernels.py with the machine's C++ compiler (-O3 -march=native -fopenmp) and
// called through ctypes; every caller has a torch fallback. OpenMP resolves to the libgomp that torch loaded,
// so these threads are torch's threads.
//
// A panel is computed in register blocks of R rows x SW columns: R*NV vector accumulators (NV = SW / VL) stay
// in registers for the whole reduction over K, each weight vector loaded once feeds R fused multiply-adds.
#include <algorithm>
#include <cstdint>
#include <cstring>

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

// Rows per register block for NV vectors per row: R*NV accumulators + NV weights + 1 broadcast <= NREG.
constexpr int rmax(int nv) { return std::min(8, std::max(1, (NREG - 1 - nv) / nv)); }

template <int R, int NV>
static inline void block(const float* __restrict x, int64_t ldx, const float* __restrict w, int64_t k_len,
                         const float* __restrict b, float* __restrict y, int64_t ldy, bool accumulate) {
  constexpr int SW = NV * VL;
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j)
      acc[r][j] = accumulate ? load(y + r * ldy + j * VL) : (b ? load(b + j * VL) : vf{});
  for (int64_t k = 0; k < k_len; ++k) {
    vf wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = load(w + k * SW + j * VL);
    for (int r = 0; r < R; ++r) {
      const float xs = x[r * ldx + k];
      for (int j = 0; j < NV; ++j) acc[r][j] += xs * wv[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) store(y + r * ldy + j * VL, acc[r][j]);
}

template <int NV>
static void panel(const float* x, int64_t rows, int64_t K, int64_t ldx, const float* w, const float* b, float* y,
                  int64_t ldy) {
  constexpr int R = rmax(NV);
  constexpr int SW = NV * VL;
  // One pass over K when the rows fit one block; else K in chunks that stay in L2 while every block reads them.
  const int64_t kb = rows <= R ? K : std::max<int64_t>(64, (128 * 1024) / (SW * 4));
  for (int64_t k0 = 0; k0 < K; k0 += kb) {
    const int64_t kl = std::min(kb, K - k0);
    const bool acc = k0 > 0;
    for (int64_t r0 = 0; r0 < rows; r0 += R) {
      const float* xr = x + r0 * ldx + k0;
      const float* wk = w + k0 * SW;
      float* yr = y + r0 * ldy;
      switch (std::min<int64_t>(R, rows - r0)) {
#define GPT2FN_CASE(n) \
  case n: if constexpr (n <= R) block<n, NV>(xr, ldx, wk, kl, b, yr, ldy, acc); break;
        GPT2FN_CASE(1) GPT2FN_CASE(2) GPT2FN_CASE(3) GPT2FN_CASE(4)
        GPT2FN_CASE(5) GPT2FN_CASE(6) GPT2FN_CASE(7) GPT2FN_CASE(8)
#undef GPT2FN_CASE
      }
    }
  }
}

template <int NV>
static void run(const float* x, int64_t rows, int64_t K, int64_t ldx, const float* w, int64_t P, const float* b,
                float* y, int64_t ldy, int threads) {
  constexpr int SW = NV * VL;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t p = 0; p < P; ++p)
    panel<NV>(x, rows, K, ldx, w + p * K * SW, b ? b + p * SW : nullptr, y + p * SW, ldy);
}

extern "C" {

// The vector width in floats; a panel width must be a multiple of it, at most 4 vectors.
int gpt2fn_vector_width(void) { return VL; }

// Panel widths from fastest to slowest on this build: 3 vectors (R=8 on AVX-512), then 4, 2, 1.
int gpt2fn_panel_widths(int* out) {
#if defined(__AVX512F__)
  const int nv[] = {3, 4, 2, 1};
#else
  const int nv[] = {2, 1, 3, 4};
#endif
  for (int i = 0; i < 4; ++i) out[i] = nv[i] * VL;
  return 4;
}

// y [rows, P*SW] (row stride ldy) = x [rows, K] (row stride ldx) @ W + b; b may be null. Returns 0, or -1 when
// SW is not 1..4 vectors.
int gpt2fn_panel_affine(const float* x, int64_t rows, int64_t K, int64_t ldx, const float* w, int64_t P,
                        int64_t SW, const float* b, float* y, int64_t ldy, int threads) {
  switch (SW / VL * (SW % VL == 0)) {
    case 1: run<1>(x, rows, K, ldx, w, P, b, y, ldy, threads); return 0;
    case 2: run<2>(x, rows, K, ldx, w, P, b, y, ldy, threads); return 0;
    case 3: run<3>(x, rows, K, ldx, w, P, b, y, ldy, threads); return 0;
    case 4: run<4>(x, rows, K, ldx, w, P, b, y, ldy, threads); return 0;
    default: return -1;
  }
}
}
