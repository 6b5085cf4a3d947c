// Few-row products over the matrices as they are stored: no copy, no layout of our own (gpt2fn.kernels).
//
//   gpt2fn_affine_<T>    y = x @ W + b   W [K, N] row-major (the [in, out] orientation of every GPT-2 matrix)
//   gpt2fn_affine_t_<T>  y = x @ E^T     E [N, K] row-major (the tied head: the token embedding [vocab, d_model])
//
// T is the stored type of W (E): f32, bf16, f16, or i8 with one fp32 scale per output column (y = (x @ Q) * s + b).
// x, y, b and s are fp32; stored elements are widened to fp32 in registers and accumulated in fp32, so 16-bit and
// 8-bit weights cost their own bytes of memory traffic and nothing else.
// (int8 on AVX-512BW: integer products instead, see "int8 weights with integer products" below.)
//
// Built on first use by gpt2fn/native with the machine's C++ compiler (-O3 -march=native -fopenmp) and called
// through ctypes; every caller has a torch fallback. OpenMP resolves to the libgomp torch loaded, so these
// threads are torch's threads.
//
// gpt2fn_affine: K is cut into two halves fixed by K (`Pieces`); each half is summed into a partial of its own
// and y = (p0 + p1) * s + b at the end, so a row's bits depend on K only, not on the thread count or the batch.
// With two threads each walks one half, the full width, front to back; more threads share a half by columns. A walk
// takes KC rows at a time and visits its bands of up to 3 vectors (6 for one input row, 4 for two) left to right; a
// band keeps a block of up to 8 rows x 3 vectors of accumulators in registers over the chunk (one weight load feeds
// 8 multiply-adds) and parks them in the partial between chunks; rows past one block reuse the band from L1. While
// a chunk is walked, the next one is prefetched in address order, a share in each band (`Ahead`): DRAM then sees
// one stream per thread instead of KC short ones.
//
// gpt2fn_affine_t: each thread owns a contiguous range of E's rows (output columns); G of them at a time are
// dotted with a block of R input rows, G*R vector accumulators, reduced once at the end. Every E row is read once
// per block of R input rows, front to back, and the group two groups ahead is prefetched meanwhile.
#include "vectors.h"
#include <unistd.h>

// Rows per register block with NV vectors per row: R*NV accumulators + NV weights + 1 broadcast <= NREG.
constexpr int rmax(int nv) { return std::min(8, std::max(1, (NREG - 1 - nv) / nv)); }

// Software prefetch in address order: a cursor over `rows` row segments of `lpr` cache lines each (segment r starts
// at base + r * stride), `per` lines each time it is stepped, `left` lines in all. The kernels read a matrix in
// register-sized pieces of many rows at once, an order the hardware prefetcher follows poorly (about 20 GB/s on an
// AMD EPYC, against 29-33 for the same bytes read front to back); prefetching the next piece of the walk front to
// back, spread over the current one, lets DRAM see one sequential stream per thread.
struct Ahead {
  const char* row = nullptr;  // the current segment's first line
  const char* at = nullptr;   // the next line to prefetch
  int64_t stride = 0, lpr = 1, in_row = 0, left = 0, per = 0;
  Ahead() = default;
  Ahead(const char* base, int64_t stride_, int64_t lpr_, int64_t lines)
      : row(base), at(base), stride(stride_), lpr(lpr_), in_row(lpr_), left(lines) {}
  inline void step() {
    for (int64_t i = 0; i < per && left > 0; ++i, --left) {
      __builtin_prefetch(at, 0, 2);
      at += 64;
      if (--in_row == 0) {
        row += stride;
        at = row;
        in_row = lpr;
      }
    }
  }
};

// acc[r][j] over k in [0, k_len): y[r, j*VL..] (+)= sum_k x[r, k] * w[k, j*VL..] (= when first)
template <int R, int NV, class W>
static inline void band(const float* __restrict x, int64_t ldx, const W* __restrict w, int64_t ldw,
                        int64_t k_len, float* __restrict y, int64_t ldy, bool first, Ahead& ahead) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = first ? vf{} : load(y + r * ldy + j * VL);
  Ahead ah = ahead;  // a copy in registers: stepping `ahead` itself stored and reloaded its cursor every k
  for (int64_t k = 0; k < k_len; ++k) {
    vf wv[NV];
    const W* wk = w + k * ldw;
    if (ah.per) ah.step();
    for (int j = 0; j < NV; ++j) wv[j] = widen(wk + j * VL);
    for (int r = 0; r < R; ++r) {
      const vf xs = splat(x[r * ldx + k]);
      for (int j = 0; j < NV; ++j) acc[r][j] = madd(xs, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) store(y + r * ldy + j * VL, acc[r][j]);
  ahead = ah;
}

// f(std::integral_constant<int, n>{}, r0) for each block of up to R rows starting at row r0 (n rows in it): every
// register-blocked kernel below is instantiated for each block height it can meet, and called through this.
template <int R, class F>
static inline void row_blocks(int64_t rows, F&& f) {
  static_assert(1 <= R && R <= 8, "row blocks of 1 to 8 rows");
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    switch (std::min<int64_t>(R, rows - r0)) {
#define GPT2FN_CASE(n) \
  case n: if constexpr (n <= R) f(std::integral_constant<int, n>{}, r0); break;
      GPT2FN_CASE(1) GPT2FN_CASE(2) GPT2FN_CASE(3) GPT2FN_CASE(4)
      GPT2FN_CASE(5) GPT2FN_CASE(6) GPT2FN_CASE(7) GPT2FN_CASE(8)
#undef GPT2FN_CASE
    }
  }
}

// One band of NV vectors for every row block, over one chunk of K (the first block issues the prefetches; the
// others read the band again from L1).
template <int NV, class W>
static inline void band_rows(const float* x, int64_t rows, int64_t ldx, const W* w, int64_t ldw, int64_t k_len,
                             float* y, int64_t ldy, bool first, Ahead& ahead) {
  Ahead none;
  row_blocks<rmax(NV)>(rows, [&](auto n, int64_t r0) {
    band<decltype(n)::value, NV>(x + r0 * ldx, ldx, w, ldw, k_len, y + r0 * ldy, ldy, first, r0 == 0 ? ahead : none);
  });
}

// Rows of W per chunk of the walk, for `rows` inputs: one chunk is prefetched while the one before it is walked, so
// chunks stay a few hundred KB (L2); more rows spend longer per chunk and park their accumulators less often.
// Measured on the AMD EPYC (GPT-2 124M's 48 block products, bf16, 2 threads): 16 rows for 1-2 inputs, 32 for 3-4,
// 64 up to 16, 128 past that.
static inline int64_t chunk_rows(int64_t rows) { return rows <= 2 ? 16 : rows <= 4 ? 32 : rows <= 16 ? 64 : 128; }

// ... and at most this many bytes of W per chunk: an eighth of the L2 (the chunk walked, the one prefetched, the
// partials and the inputs all stay in it). On an AMD EPYC 7003 (512 KB of L2) 64 rows of an fp32 [768, 2304] half
// were 590 KB, and the walk thrashed: the 8-row fp32 products took 52 ms instead of 39 (docs/performance.md run 7).
// The chunk changes where the partial sums are parked, never their order, so it changes no bits.
static int64_t chunk_bytes() {
  static const int64_t bytes = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#else
    const long l2 = 0;  // unknown: 64 KB
#endif
    return l2 > 0 ? std::min<int64_t>(512 << 10, std::max<int64_t>(32 << 10, l2 / 8)) : int64_t(64 << 10);
  }();
  return bytes;
}

// Columns [c0, c0 + nvec * VL) of y for every row, over rows [k0, k1) of W in chunks of kc rows (0: `chunk_rows`,
// at most `chunk_bytes` of the walk's columns); y starts from zero (the caller adds the pieces, the scales and the
// bias). While one chunk is walked band by band, the next
// chunk's columns [c0, c0 + nvec * VL) are prefetched front to back, a share in each band.
// Vectors per band for 1 and 2 input rows (0: bands of 3): a band of 3 vectors gives one row 3 accumulators, so a
// step of k was 3 multiply-adds against a fixed cost per step (the broadcast, the loop, the prefetch cursor, a new
// cache line of W), and 16-bit and int8 weights ran no faster than their step count allowed. Measured on the AMD
// EPYC 7003 (AVX2; GPT-2 124M's 48 block products, 2 threads, interleaved builds): 1 row int8 8.4 -> 5.6 ms, bf16
// 10.7 -> 9.4 ms; 2 rows int8 9.0 -> 7.6 ms, bf16 13.0 -> 10.1 ms. Wider bands were slower (8 for 1 row). A band
// holds whole columns, so the width changes no column's sum.
static inline int wide_band(int64_t rows) { return rows == 1 ? 6 : rows == 2 ? 4 : 0; }
static inline int64_t band_count(int64_t nvec, int wide) {
  return wide ? nvec / wide + (nvec % wide + 2) / 3 : (nvec + 2) / 3;
}

template <class W>
static void columns(const float* x, int64_t rows, int64_t ldx, const W* w, int64_t ldw, int64_t k0, int64_t k1,
                    float* y, int64_t ldy, int64_t c0, int64_t nvec, int64_t kc) {
  const int wide = wide_band(rows);
  const int64_t nbands = band_count(nvec, wide);
  if (kc <= 0)
    kc = std::max<int64_t>(4, std::min<int64_t>(chunk_rows(rows), chunk_bytes() / (nvec * VL * int64_t(sizeof(W)))));
  for (int64_t ka = k0; ka < k1; ka += kc) {
    const int64_t kl = std::min(kc, k1 - ka), next = std::min(kc, k1 - ka - kl);
    const bool first = ka == k0;
    const float* xk = x + ka;
    const W* wk = w + ka * ldw;
    const int64_t lpr = (nvec * VL * int64_t(sizeof(W)) + 63) / 64 + 1;  // + 1: a segment may start mid-line
    Ahead ahead(reinterpret_cast<const char*>(w + (ka + kl) * ldw + c0), ldw * int64_t(sizeof(W)), lpr, next * lpr);
    ahead.per = (next * lpr + nbands * kl - 1) / (nbands * kl);
    int64_t v = 0;
    if (wide == 6)
      for (; v + 6 <= nvec; v += 6)
        band_rows<6>(xk, rows, ldx, wk + c0 + v * VL, ldw, kl, y + c0 + v * VL, ldy, first, ahead);
    else if (wide == 4)
      for (; v + 4 <= nvec; v += 4)
        band_rows<4>(xk, rows, ldx, wk + c0 + v * VL, ldw, kl, y + c0 + v * VL, ldy, first, ahead);
    for (; v < nvec; v += 3) {
      const int64_t c = c0 + v * VL;
      switch (std::min<int64_t>(3, nvec - v)) {
        case 3: band_rows<3>(xk, rows, ldx, wk + c, ldw, kl, y + c, ldy, first, ahead); break;
        case 2: band_rows<2>(xk, rows, ldx, wk + c, ldw, kl, y + c, ldy, first, ahead); break;
        default: band_rows<1>(xk, rows, ldx, wk + c, ldw, kl, y + c, ldy, first, ahead); break;
      }
    }
  }
}

// The last N % VL columns, one at a time (a vocabulary of 50257 leaves one).
template <class W>
static void tail_columns(const float* x, int64_t rows, int64_t K, int64_t ldx, const W* w, int64_t ldw,
                         const float* sc, const float* b, float* y, int64_t ldy, int64_t c0, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = c0; c < c0 + n; ++c) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s = madd1(x[r * ldx + k], widen1(w[k * ldw + c]), s);
      y[r * ldy + c] = (sc ? s * sc[c] : s) + (b ? b[c] : 0.0f);
    }
}

template <int G, int R, class W>
static inline void dots(const float* __restrict x, int64_t ldx, const W* __restrict e, int64_t lde, int64_t K,
                        const float* sc, float* __restrict y, int64_t ldy, Ahead& ahead) {
  vf acc[G][R];
  for (int g = 0; g < G; ++g)
    for (int r = 0; r < R; ++r) acc[g][r] = vf{};
  const int64_t kv = K / VL * VL;
  for (int64_t k = 0; k < kv; k += VL) {
    if (ahead.per) ahead.step();
    vf ev[G];
    for (int g = 0; g < G; ++g) ev[g] = widen(e + g * lde + k);
    for (int r = 0; r < R; ++r) {
      const vf xv = load(x + r * ldx + k);
      for (int g = 0; g < G; ++g) acc[g][r] = madd(ev[g], xv, acc[g][r]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int r = 0; r < R; ++r) {
      float s = 0.0f;
      for (int i = 0; i < VL; ++i) s += acc[g][r][i];
      for (int64_t k = kv; k < K; ++k) s = madd1(widen1(e[g * lde + k]), x[r * ldx + k], s);
      y[r * ldy + g] = sc ? s * sc[g] : s;
    }
}

template <int G, int R, class W>
static void dot_rows(const float* x, int64_t rows, int64_t ldx, const W* e, int64_t lde, int64_t K,
                     const float* sc, float* y, int64_t ldy, Ahead& ahead) {
  Ahead none;
  row_blocks<R>(rows, [&](auto n, int64_t r0) {
    dots<G, decltype(n)::value>(x + r0 * ldx, ldx, e, lde, K, sc, y + r0 * ldy, ldy, r0 == 0 ? ahead : none);
  });
}

// The prefetch for a group of G rows of E starting at row n: the group AHEAD_GROUPS further on, if it is still the
// thread's (rows before n1), spread over the group's K / VL steps.
constexpr int64_t AHEAD_GROUPS = 2;
template <class W>
static inline Ahead group_ahead(const W* e, int64_t lde, int64_t K, int64_t n, int64_t G, int64_t n1, int64_t step) {
  const int64_t at = n + AHEAD_GROUPS * G, steps = std::max<int64_t>(1, K / step);
  if (at + G > n1) return Ahead();
  const int64_t lpr = (K * int64_t(sizeof(W)) + 63) / 64 + 1;
  Ahead a(reinterpret_cast<const char*>(e + at * lde), lde * int64_t(sizeof(W)), lpr, G * lpr);
  a.per = (G * lpr + steps - 1) / steps;
  return a;
}

// Output columns [n0, n1) of y = x @ E^T.
template <class W>
static void dot_columns(const float* x, int64_t rows, int64_t K, int64_t ldx, const W* e, int64_t lde,
                        const float* sc, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int RB = NREG >= 32 ? 6 : 2;  // 4*RB accumulators + 4 rows of E + 1 input vector
  int64_t n = n0;
  auto s = [&](int64_t i) { return sc ? sc + i : nullptr; };
  constexpr int G1 = NREG >= 32 ? 8 : 6;  // one input row: G1 accumulators + G1 rows of E + 1 input vector
  if (rows == 1) {
    for (; n + G1 <= n1; n += G1) {
      Ahead a = group_ahead(e, lde, K, n, G1, n1, VL);
      dots<G1, 1>(x, ldx, e + n * lde, lde, K, s(n), y + n, ldy, a);
    }
  } else if (rows > RB && (NREG < 32 || rows <= 8)) {  // 3 rows of E x blocks of R3 rows: one block of up to 8
    constexpr int R3 = NREG >= 32 ? 8 : 4;             // rows (32 registers), or blocks of 4 (16 registers)
    for (; n + 3 <= n1; n += 3) {
      Ahead a = group_ahead(e, lde, K, n, 3, n1, VL);
      dot_rows<3, R3>(x, rows, ldx, e + n * lde, lde, K, s(n), y + n, ldy, a);
    }
  } else {
    for (; n + 4 <= n1; n += 4) {
      Ahead a = group_ahead(e, lde, K, n, 4, n1, VL);
      dot_rows<4, RB>(x, rows, ldx, e + n * lde, lde, K, s(n), y + n, ldy, a);
    }
  }
  Ahead none;
  for (; n < n1; ++n) dot_rows<1, RB>(x, rows, ldx, e + n * lde, lde, K, s(n), y + n, ldy, none);
}

// The reduction over K is cut into pieces fixed by K alone (halves, for K >= 64), each summed into a partial of its
// own; then y = (p0 + p1) * s + b. A piece of a column group is a unit of work; with T threads there are T column
// groups per piece, and each thread takes the next P units in piece-major order (a piece's adjacent groups merged
// into one walk). So each of 2 threads walks one half of W, the full width, front to back; 1 thread walks both;
// more threads share each piece by columns. The arithmetic depends on K only: the same bits on any thread count,
// for a row alone or in any batch.
struct Pieces {
  int64_t K, P, G, U, n;  // n: column units (vectors, or blocks of 32 for int8)
  int64_t align;          // piece bounds are multiples of this (2: int8 pairs rows of W)
  int threads;
  Pieces(int64_t K_, int threads_, int64_t n_, int64_t align_)
      : K(K_), P(K_ >= 64 ? 2 : 1), G(std::max<int64_t>(1, std::min<int64_t>(threads_, n_))), U(P * G), n(n_),
        align(align_), threads(static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads_, U)))) {}
  int64_t bound(int64_t p) const { return p == P ? K : (K * p / P + align - 1) / align * align; }
  // f(k0, k1, piece, u0, u1) for each walk thread t of T takes: rows [k0, k1) of W, column units [u0, u1)
  template <class F>
  void walk(int t, int T, F&& f) const {
    const int64_t u0 = n ? U * t / T : 0, u1 = n ? U * (t + 1) / T : 0;
    for (int64_t p = u0 / G; u1 > u0 && p <= (u1 - 1) / G; ++p) {
      const int64_t ga = std::max(u0, p * G) - p * G, gb = std::min(u1, (p + 1) * G) - p * G;
      const int64_t v0 = n * ga / G, v1 = n * gb / G;
      if (v1 > v0) f(bound(p), bound(p + 1), p, v0, v1);
    }
  }
};

// The frame both split products share: each thread walks its units of `pc` into partial sums (P pieces of
// `per_piece` elements of type T, in a buffer of the calling thread); once every partial is written, each thread
// finishes its share of the output from them.
template <class T, class Walk, class Finish>
static void in_pieces(const Pieces& pc, int64_t per_piece, Walk&& walk, Finish&& finish) {
  thread_local std::vector<T> scratch;
  if (static_cast<int64_t>(scratch.size()) < pc.P * per_piece) scratch.resize(pc.P * per_piece);
  T* part = scratch.data();
#pragma omp parallel num_threads(pc.threads)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    walk(part, t, n);
#pragma omp barrier
    finish(part, t, n);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// int8 weights with integer products (AVX-512BW; vpdpwssd where the CPU has VNNI, else vpmaddwd + vpaddd).
//
// Each input row is rounded to 16-bit integers with one scale, xq = round(x / sx), |xq| <= amax, where
// amax = min(32767, (2^31 - 1) / (127 K)) so that no sum of K products |xq| |q| overflows int32. The sums are then
// exact integers, y = sum_k xq[k] q[k, c] * (sx * s[c]) + b[c]: the only rounding is the input's, at most sx / 2 =
// max|x| / (2 amax) per element (1/44000 .. 1/5000 of the row's largest for K = 768 .. 6400), far below the weights'
// own 8-bit step, and the result is independent of the thread count and of how K is cut.
//
// [K, N] (gpt2fn_affine_i8): rows k and k+1 of 32 columns are sign-extended to int16 and interleaved in pairs
// (vpunpcklwd / vpunpckhwd per 128-bit lane), so one vpdpwssd multiplies 16 columns by (xq[k], xq[k+1]) broadcast
// as one dword: 32 multiply-adds per instruction for every input row. The accumulators hold the columns in the
// unpack's order (lo: 8j + m, hi: 8j + 4 + m for lane j, m < 4) and are put back in order once, at the end.
// Between chunks of K they are parked in y as int32 bits. [N, K] (gpt2fn_affine_t_i8, the tied head): each row
// of E is contiguous along K, so 32 of its int8 widen to int16 and meet 32 of xq directly.
#if defined(__AVX512BW__)
#define GPT2FN_I8DOT 1
static inline __m512i dp16(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

static inline int64_t even(int64_t k) { return (k + 1) / 2 * 2; }

// Row r of x -> xq[r, 0..even(K)) (zero padded) and its scale sx[r] (NaN for a row holding inf or NaN, so the
// row's outputs are NaN, as the fp32 product's would be non-finite).
static void quantize_rows(const float* x, int64_t rows, int64_t K, int64_t ldx, int16_t* xq, int64_t ldq,
                          float* sx) {
  const float amax = float(std::min<int64_t>(32767, (int64_t(2147483647) / 127) / std::max<int64_t>(1, K)));
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    int16_t* q = xq + r * ldq;
    __m512 m = _mm512_setzero_ps();
    __mmask16 nan = 0;  // max drops NaN, so it is looked for beside it (inf survives the max)
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m512 v = _mm512_loadu_ps(xr + k);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      m = _mm512_max_ps(m, _mm512_abs_ps(v));
    }
    float top = _mm512_reduce_max_ps(m);
    bool finite = nan == 0;
    for (; k < K; ++k) {
      finite &= !std::isnan(xr[k]);
      top = std::max(top, std::fabs(xr[k]));
    }
    finite &= std::isfinite(top);
    if (!finite || top == 0.0f) {
      std::memset(q, 0, sizeof(int16_t) * even(K));
      sx[r] = finite ? 0.0f : std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const __m512 inv = _mm512_set1_ps(amax / top);
    for (k = 0; k + 16 <= K; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k),
                          _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), inv))));
    for (; k < K; ++k) q[k] = int16_t(std::nearbyint(xr[k] * (amax / top)));
    if (K % 2) q[K] = 0;
    sx[r] = top / amax;
  }
}

// The input rows rounded for the integer products: xq [rows, ld] (ld = even(K) + 32, room for a vector read past
// an odd K) and one scale per row.
struct RoundedRows {
  int64_t ld;
  std::vector<int16_t> q;
  std::vector<float> s;
  RoundedRows(const float* x, int64_t rows, int64_t K, int64_t ldx)
      : ld(even(K) + 32), q(rows * ld), s(rows) {
    quantize_rows(x, rows, K, ldx, q.data(), ld, s.data());
  }
};

static inline __m512i load_i32(const int32_t* p) { return _mm512_loadu_si512(p); }
static inline void store_i32(int32_t* p, __m512i v) { _mm512_storeu_si512(p, v); }
static inline __m512i widen16(const int8_t* p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Over k in [k0, k1), R rows x NB blocks of 32 columns: part[r][block] (int32, in the unpack's column order) (+)=
// sum xq * q (= when first). K: the odd last row (K odd) pairs with a zero row.
template <int R, int NB>
static inline void iband(const int16_t* __restrict xq, int64_t ldq, const int8_t* __restrict w, int64_t ldw,
                         int64_t k0, int64_t k1, int64_t K, int32_t* __restrict part, int64_t ldp, bool first,
                         Ahead& ahead) {
  __m512i acc[R][NB][2];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j)
      for (int h = 0; h < 2; ++h)
        acc[r][j][h] = first ? _mm512_setzero_si512() : load_i32(part + r * ldp + j * 32 + h * 16);
  int64_t k = k0;
  for (; k + 2 <= k1; k += 2) {
    const int8_t* w0 = w + k * ldw;
    if (ahead.per) ahead.step();
    __m512i p[NB][2];
    for (int j = 0; j < NB; ++j) {
      const __m512i a = widen16(w0 + j * 32), c = widen16(w0 + ldw + j * 32);
      p[j][0] = _mm512_unpacklo_epi16(a, c);
      p[j][1] = _mm512_unpackhi_epi16(a, c);
    }
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, xq + r * ldq + k, 4);
      const __m512i xv = _mm512_set1_epi32(pair);
      for (int j = 0; j < NB; ++j) {
        acc[r][j][0] = dp16(acc[r][j][0], p[j][0], xv);
        acc[r][j][1] = dp16(acc[r][j][1], p[j][1], xv);
      }
    }
  }
  if (k < k1) {  // the odd last row of W (k == K - 1), paired with zero
    const int8_t* w0 = w + k * ldw;
    __m512i p[NB][2];
    for (int j = 0; j < NB; ++j) {
      const __m512i a = widen16(w0 + j * 32), c = _mm512_setzero_si512();
      p[j][0] = _mm512_unpacklo_epi16(a, c);
      p[j][1] = _mm512_unpackhi_epi16(a, c);
    }
    for (int r = 0; r < R; ++r) {
      const __m512i xv = _mm512_set1_epi32(int32_t(uint16_t(xq[r * ldq + k])));
      for (int j = 0; j < NB; ++j) {
        acc[r][j][0] = dp16(acc[r][j][0], p[j][0], xv);
        acc[r][j][1] = dp16(acc[r][j][1], p[j][1], xv);
      }
    }
  }
  (void)K;
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j)
      for (int h = 0; h < 2; ++h) store_i32(part + r * ldp + j * 32 + h * 16, acc[r][j][h]);
}

template <int NB>
constexpr int irmax() { return std::min(8, (31 - 2 * NB - 2) / (2 * NB)); }

template <int NB>
static inline void iband_rows(const int16_t* xq, int64_t ldq, int64_t rows, const int8_t* w, int64_t ldw, int64_t k0,
                              int64_t k1, int64_t K, int32_t* part, int64_t ldp, bool first, Ahead& ahead) {
  Ahead none;
  row_blocks<irmax<NB>()>(rows, [&](auto n, int64_t r0) {
    iband<decltype(n)::value, NB>(xq + r0 * ldq, ldq, w, ldw, k0, k1, K, part + r0 * ldp, ldp, first,
                                  r0 == 0 ? ahead : none);
  });
}

// Blocks [c0 / 32, c0 / 32 + nblk) of the partial sums over rows [k0, k1) of W, in chunks of kc rows (even), bands
// of nb blocks; the next chunk is prefetched front to back while one is walked (as `columns`).
static void iblocks(const int16_t* xq, int64_t ldq, int64_t rows, int64_t K, const int8_t* w, int64_t ldw,
                    int64_t k0, int64_t k1, int32_t* part, int64_t ldp, int64_t c0, int64_t nblk, int64_t kc,
                    int nb) {
  for (int64_t ka = k0; ka < k1; ka += kc) {
    const int64_t kb = std::min(k1, ka + kc), next = std::min(kc, k1 - kb), steps = (kb - ka + 1) / 2;
    const bool first = ka == k0;
    const int64_t lpr = (nblk * 32 + 63) / 64 + 1;  // + 1: a segment may start mid-line
    Ahead ahead(reinterpret_cast<const char*>(w + kb * ldw + c0), ldw, lpr, next * lpr);
    const int64_t lines = next * lpr;
    int64_t j = 0;
#define GPT2FN_BAND(n)                                                                                           \
  ahead.per = (lines * n + nblk * steps - 1) / (nblk * steps);                                                   \
  iband_rows<n>(xq, ldq, rows, w + c0 + j * 32, ldw, ka, kb, K, part + c0 + j * 32, ldp, first, ahead)
    if (nb >= 4) for (; j + 4 <= nblk; j += 4) { GPT2FN_BAND(4); }
    if (nb >= 2) for (; j + 2 <= nblk; j += 2) { GPT2FN_BAND(2); }
    for (; j < nblk; ++j) { GPT2FN_BAND(1); }
#undef GPT2FN_BAND
  }
}

// y[r, blocks j0..j1) = fma(sum of the P partials, sx[r] * s, b): the columns back in order, one rounding.
// out[c'] takes lo dword 4j + m (m = c' % 8 < 4) or hi dword 4j + m - 4, j = c' / 8.
static void ifinish(const int32_t* part, int64_t P, int64_t rows, int64_t ldp, int64_t j0, int64_t j1,
                    const float* sx, const float* s, const float* b, float* y, int64_t ldy) {
  const __m512i first16 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second16 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 rs = _mm512_set1_ps(sx[r]);
    for (int64_t j = j0; j < j1; ++j) {
      __m512i sum[2];
      for (int h = 0; h < 2; ++h) {
        sum[h] = load_i32(part + r * ldp + j * 32 + h * 16);
        for (int64_t p = 1; p < P; ++p)
          sum[h] = _mm512_add_epi32(sum[h], load_i32(part + (p * rows + r) * ldp + j * 32 + h * 16));
      }
      const __m512 lo = _mm512_cvtepi32_ps(sum[0]), hi = _mm512_cvtepi32_ps(sum[1]);
      for (int h = 0; h < 2; ++h) {
        const int64_t c = j * 32 + h * 16;
        const __m512 v = _mm512_permutex2var_ps(lo, h ? second16 : first16, hi);
        _mm512_storeu_ps(y + r * ldy + c, _mm512_fmadd_ps(v, _mm512_mul_ps(rs, _mm512_loadu_ps(s + c)),
                                                          b ? _mm512_loadu_ps(b + c) : _mm512_setzero_ps()));
      }
    }
  }
}

// The last N % 32 columns, exact integer sums.
static void itail(const int16_t* xq, int64_t ldq, const float* sx, int64_t rows, int64_t K, const int8_t* w,
                  int64_t ldw, const float* s, const float* b, float* y, int64_t ldy, int64_t c0, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = c0; c < c0 + n; ++c) {
      int32_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += int32_t(xq[r * ldq + k]) * int32_t(w[k * ldw + c]);
      y[r * ldy + c] = std::fma(float(acc), sx[r] * s[c], b ? b[c] : 0.0f);
    }
}

// As `affine`: two pieces of K (their bounds even), T column groups of 32-column blocks per piece; the integer
// partials add exactly, so any cut gives the same sums.
static int affine_i8dot(const float* x, int64_t rows, int64_t K, int64_t ldx, const int8_t* w, int64_t N,
                        int64_t ldw, const float* s, const float* b, float* y, int64_t ldy, int threads, int64_t kc) {
  const RoundedRows xr(x, rows, K, ldx);
  const int16_t* xq = xr.q.data();
  const float* sx = xr.s.data();
  const int64_t ldq = xr.ld;
  const int64_t nblk = N / 32, tail = N - nblk * 32, ldp = nblk * 32;
  const Pieces pc(K, threads, nblk, 2);
  kc = kc > 0 ? even(kc) : even(chunk_rows(rows));
  const int nb = rows == 1 ? 4 : rows <= 3 ? 2 : 1;
  in_pieces<int32_t>(
      pc, rows * ldp,
      [&](int32_t* part, int t, int T) {
        pc.walk(t, T, [&](int64_t k0, int64_t k1, int64_t p, int64_t j0, int64_t j1) {
          iblocks(xq, ldq, rows, K, w, ldw, k0, k1, part + p * rows * ldp, ldp, j0 * 32, j1 - j0, kc, nb);
        });
        if (t == T - 1 && tail) itail(xq, ldq, sx, rows, K, w, ldw, s, b, y, ldy, nblk * 32, tail);
      },
      [&](const int32_t* part, int t, int T) {
        ifinish(part, pc.P, rows, ldp, nblk * t / T, nblk * (t + 1) / T, sx, s, b, y, ldy);
      });
  return 0;
}

template <int G, int R>
static inline void idots(const int16_t* __restrict xq, int64_t ldq, const int8_t* __restrict e, int64_t lde,
                         int64_t K, const float* sx, const float* se, float* __restrict y, int64_t ldy,
                         Ahead& ahead) {
  __m512i acc[G][R];
  for (int g = 0; g < G; ++g)
    for (int r = 0; r < R; ++r) acc[g][r] = _mm512_setzero_si512();
  const int64_t kv = K / 32 * 32;
  for (int64_t k = 0; k < kv; k += 32) {
    if (ahead.per) ahead.step();
    __m512i ev[G];
    for (int g = 0; g < G; ++g) ev[g] = widen16(e + g * lde + k);
    for (int r = 0; r < R; ++r) {
      const __m512i xv = _mm512_loadu_si512(xq + r * ldq + k);
      for (int g = 0; g < G; ++g) acc[g][r] = dp16(acc[g][r], ev[g], xv);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int r = 0; r < R; ++r) {
      int32_t sum = _mm512_reduce_add_epi32(acc[g][r]);
      for (int64_t k = kv; k < K; ++k) sum += int32_t(e[g * lde + k]) * int32_t(xq[r * ldq + k]);
      y[r * ldy + g] = float(sum) * (sx[r] * se[g]);
    }
}

template <int G, int R>
static void idot_rows(const int16_t* xq, int64_t ldq, int64_t rows, const int8_t* e, int64_t lde, int64_t K,
                      const float* sx, const float* se, float* y, int64_t ldy, Ahead& ahead) {
  Ahead none;
  row_blocks<R>(rows, [&](auto n, int64_t r0) {
    idots<G, decltype(n)::value>(xq + r0 * ldq, ldq, e, lde, K, sx + r0, se, y + r0 * ldy, ldy,
                                 r0 == 0 ? ahead : none);
  });
}

static int affine_t_i8dot(const float* x, int64_t rows, int64_t K, int64_t ldx, const int8_t* e, int64_t N,
                          int64_t lde, const float* s, float* y, int64_t ldy, int threads) {
  const RoundedRows xr(x, rows, K, ldx);
  const int16_t* xq = xr.q.data();
  const float* sx = xr.s.data();
  const int64_t ldq = xr.ld;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, N / 8)));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t n1 = N * (t + 1) / T;
    int64_t n = N * t / T;
    if (rows == 1) {
      for (; n + 8 <= n1; n += 8) {
        Ahead a = group_ahead(e, lde, K, n, 8, n1, 32);
        idots<8, 1>(xq, ldq, e + n * lde, lde, K, sx, s + n, y + n, ldy, a);
      }
    } else {
      for (; n + 4 <= n1; n += 4) {
        Ahead a = group_ahead(e, lde, K, n, 4, n1, 32);
        idot_rows<4, 6>(xq, ldq, rows, e + n * lde, lde, K, sx, s + n, y + n, ldy, a);
      }
    }
    Ahead none;
    for (; n < n1; ++n) idot_rows<1, 6>(xq, ldq, rows, e + n * lde, lde, K, sx, s + n, y + n, ldy, none);
  }
  return 0;
}
#else
#define GPT2FN_I8DOT 0
#endif

template <class W>
static int affine(const float* x, int64_t rows, int64_t K, int64_t ldx, const W* w, int64_t N, int64_t ldw,
                  const float* s, const float* b, float* y, int64_t ldy, int threads, int64_t kc) {
  const int64_t nvec = N / VL, tail = N - nvec * VL, nv = nvec * VL;
  const Pieces pc(K, threads, nvec, 1);
  in_pieces<float>(
      pc, rows * nv,
      [&](float* part, int t, int T) {
        pc.walk(t, T, [&](int64_t k0, int64_t k1, int64_t p, int64_t v0, int64_t v1) {
          columns(x, rows, ldx, w, ldw, k0, k1, part + p * rows * nv, nv, v0 * VL, v1 - v0, kc);
        });
        if (t == T - 1 && tail) tail_columns(x, rows, K, ldx, w, ldw, s, b, y, ldy, nv, tail);
      },
      [&](const float* part, int t, int T) {
        const int64_t c0 = nv * t / T, c1 = nv * (t + 1) / T;
        for (int64_t r = 0; r < rows; ++r) {
          const float* p0 = part + r * nv;
          const float* p1 = pc.P == 2 ? part + (rows + r) * nv : nullptr;
          float* yr = y + r * ldy;
          for (int64_t c = c0; c < c1; ++c) {
            const float v = p1 ? p0[c] + p1[c] : p0[c];
            yr[c] = (s ? v * s[c] : v) + (b ? b[c] : 0.0f);
          }
        }
      });
  return 0;
}

template <class W>
static int affine_t(const float* x, int64_t rows, int64_t K, int64_t ldx, const W* e, int64_t N, int64_t lde,
                    const float* s, float* y, int64_t ldy, int threads) {
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, N / 8)));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    dot_columns(x, rows, K, ldx, e, lde, s, y, ldy, N * t / T, N * (t + 1) / T);
  }
  return 0;
}

extern "C" {

// The vector width in floats.
int gpt2fn_vector_width(void) { return VL; }

// Whether this build has the f16 entry points (the compiler knows _Float16).
int gpt2fn_has_f16(void) { return GPT2FN_F16; }

// The bias as fp32: b itself (btype 0, or null), or its N elements widened from bf16 (1) or fp16 (2) into a buffer
// of the calling thread, so a 16-bit tree's biases need no fp32 copy made per call in Python.
static const float* bias_f32(const void* b, int btype, int64_t N) {
  if (b == nullptr || btype == 0) return static_cast<const float*>(b);
  thread_local std::vector<float> wide;
  if (static_cast<int64_t>(wide.size()) < N) wide.resize(N);
  for (int64_t c = 0; c < N; ++c)
#if GPT2FN_F16
    wide[c] = btype == 1 ? widen1(static_cast<const bf16*>(b)[c]) : widen1(static_cast<const _Float16*>(b)[c]);
#else
    wide[c] = widen1(static_cast<const bf16*>(b)[c]);
#endif
  return wide.data();
}

// y [rows, N] (row stride ldy) = (x [rows, K] (row stride ldx) @ W [K, N] (row stride ldw)) * s + b, fp32 x, y and
// s; b fp32 (btype 0), bf16 (1) or fp16 (2); s (one scale per column, int8 only) and b may be null. kc: rows of W
// per chunk of the walk; 0 picks the default (`chunk_rows`, at most `chunk_bytes`).
// gpt2fn_affine_t: y = (x @ E^T) * s, E [N, K] (row stride lde), s one scale per row of E (int8 only) or null.
// One pair per stored type: f32, bf16, f16, i8. Each returns 0.
#define GPT2FN_TYPE(name, W)                                                                                   \
  int gpt2fn_affine_##name(const float* x, int64_t rows, int64_t K, int64_t ldx, const void* w, int64_t N,     \
                           int64_t ldw, const float* s, const void* b, int btype, float* y, int64_t ldy,       \
                           int threads, int64_t kc) {                                                          \
    return affine(x, rows, K, ldx, static_cast<const W*>(w), N, ldw, s, bias_f32(b, btype, N), y, ldy, threads, \
                  kc);                                                                                         \
  }                                                                                                            \
  int gpt2fn_affine_t_##name(const float* x, int64_t rows, int64_t K, int64_t ldx, const void* e, int64_t N,   \
                             int64_t lde, const float* s, float* y, int64_t ldy, int threads) {                \
    return affine_t(x, rows, K, ldx, static_cast<const W*>(e), N, lde, s, y, ldy, threads);                    \
  }
GPT2FN_TYPE(f32, float)
GPT2FN_TYPE(bf16, bf16)
#if GPT2FN_F16
GPT2FN_TYPE(f16, _Float16)
#endif
#undef GPT2FN_TYPE

// int8: the integer products where the CPU has them (GPT2FN_I8DOT), else widened to fp32 like the others.
int gpt2fn_affine_i8(const float* x, int64_t rows, int64_t K, int64_t ldx, const void* w, int64_t N, int64_t ldw,
                     const float* s, const void* b, int btype, float* y, int64_t ldy, int threads, int64_t kc) {
  const float* bf = bias_f32(b, btype, N);
#if GPT2FN_I8DOT
  return affine_i8dot(x, rows, K, ldx, static_cast<const int8_t*>(w), N, ldw, s, bf, y, ldy, threads, kc);
#else
  return affine(x, rows, K, ldx, static_cast<const int8_t*>(w), N, ldw, s, bf, y, ldy, threads, kc);
#endif
}
int gpt2fn_affine_t_i8(const float* x, int64_t rows, int64_t K, int64_t ldx, const void* e, int64_t N, int64_t lde,
                       const float* s, float* y, int64_t ldy, int threads) {
#if GPT2FN_I8DOT
  return affine_t_i8dot(x, rows, K, ldx, static_cast<const int8_t*>(e), N, lde, s, y, ldy, threads);
#else
  return affine_t(x, rows, K, ldx, static_cast<const int8_t*>(e), N, lde, s, y, ldy, threads);
#endif
}

// Whether int8 products are integer sums of 16-bit-rounded inputs (1) or fp32 products of widened weights (0).
int gpt2fn_i8_integer(void) { return GPT2FN_I8DOT; }
}
