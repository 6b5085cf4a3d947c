// Attention of one query per row and head (a decode step) over a key/value cache as it is stored (gpt2fn.kernels):
//
//   gpt2fn_attend_<T>          z[b, h, :] = sum_t p[t] v[b, h, t, :],  p = softmax over the visible t of q[b, h, :] . k[b, h, t, :] * scale
//   gpt2fn_attend_append_<T>   the same, after writing the step's new key and value (fp32, rounded to T) into slot
//                              `*slot` of the cache: a decode step's attention in one call, read from the qkv product
//
// q and z are fp32; the cache's keys and values fp32, bf16 or fp16 (T), [batch, heads, slots, head_dim] with any
// strides and unit stride along head_dim, widened to fp32 in registers; scores, softmax and sums are fp32. A slot t
// is visible where mask[b * msb + t * mst] is nonzero (bool), or every t < width without a mask; a row must see at
// least one slot (a decode step's query always sees its own).
//
// Why a kernel: a decode step's attention is a few hundred KB to a few MB of cache per layer, read once. torch's
// fused attention spends about 50 us per call on a batch-1 step on the AMD EPYC before reading anything, and needs
// keys and values in the query's dtype, so a 16-bit cache would be widened into a copy first. Each (row, head)
// pair reads its keys and values front to back once; pairs are shared among the threads. The append form also
// spares a one-token step the torch calls around it (splitting the heads, two index_copy_, slicing the cache to
// the visible width, merging the heads: about 60 us a layer at batch 1 on the AMD EPYC, docs/performance.md).
#include "vectors.h"

// e^x for x in [-87.3, 0] (scores minus their maximum), relative error about 2e-7 (Cephes' expf polynomial):
// x = n ln2 + r with |r| <= ln2 / 2, e^r = 1 + r + r^2 p(r), 2^n through the exponent bits.
static inline vf vexp(vf x) {
  x = x < -87.3f ? splat(-87.3f) : x;
  const vf n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23
  const vf r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vf e = p * (r * r) + r + 1.0f;
  typedef int32_t vi __attribute__((vector_size(VL * 4), aligned(4)));
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return e * two_n;
}

// An fp32 value rounded to the stored type as torch rounds it (`Tensor.to`): to nearest, ties to even; bf16's NaN
// is torch's quiet 0x7FC0.
static inline void narrow(float s, float* d) { *d = s; }
static inline void narrow(float s, bf16* d) {
  uint32_t u;
  std::memcpy(&u, &s, 4);
  d->bits = std::isnan(s) ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
#if GPT2FN_F16
static inline void narrow(float s, _Float16* d) { *d = static_cast<_Float16>(s); }
#endif

template <class T>
static inline float dot(const float* __restrict q, const T* __restrict k, int64_t D) {
  vf acc = vf{};
  int64_t d = 0;
  for (; d + VL <= D; d += VL) acc = madd(load(q + d), widen(k + d), acc);
  float s = 0.0f;
  for (int i = 0; i < VL; ++i) s += acc[i];
  for (; d < D; ++d) s = madd1(q[d], widen1(k[d]), s);
  return s;
}

// One (row, head) pair: scores into p [width], then z.
template <class T>
static void attend_one(const float* __restrict q, const T* __restrict k, const T* __restrict v, int64_t kst,
                       int64_t width, int64_t D, const bool* mask, int64_t mst, float scale, float* __restrict p,
                       float* __restrict z) {
  constexpr float none = -std::numeric_limits<float>::infinity();
  float top = none;
  for (int64_t t = 0; t < width; ++t) {
    const bool seen = mask == nullptr || mask[t * mst];
    p[t] = seen ? dot(q, k + t * kst, D) * scale : none;
    top = std::max(top, p[t]);
  }
  vf total = vf{};
  int64_t t = 0;
  for (; t + VL <= width; t += VL) {
    const vf s = load(p + t);
    const vf e = s == none ? vf{} : vexp(s - top);  // a hidden slot weighs exactly 0
    store(p + t, e);
    total += e;
  }
  float sum = 0.0f;
  for (int i = 0; i < VL; ++i) sum += total[i];
  for (; t < width; ++t) {
    p[t] = p[t] == none ? 0.0f : std::exp(p[t] - top);
    sum += p[t];
  }
  const float inv = 1.0f / sum;
  constexpr int MAXV = 16;  // head_dim up to 16 vectors in registers (256 floats with AVX-512)
  const int64_t nv = std::min<int64_t>(D / VL, MAXV), dv = nv * VL;
  vf acc[MAXV];
  for (int j = 0; j < MAXV; ++j) acc[j] = vf{};
  for (t = 0; t < width; ++t) {
    if (p[t] == 0.0f) continue;
    const vf w = splat(p[t]);
    const T* vt = v + t * kst;
    for (int j = 0; j < nv; ++j) acc[j] = madd(w, widen(vt + j * VL), acc[j]);
  }
  for (int j = 0; j < nv; ++j) store(z + j * VL, acc[j] * inv);
  for (int64_t d = dv; d < D; ++d) {  // past the vectors held in registers
    float s = 0.0f;
    for (t = 0; t < width; ++t) s += p[t] * widen1(v[t * kst + d]);
    z[d] = s * inv;
  }
}

// With kn (and vn): first the pair's new key kn + b * nsb + h * nsh (value vn + ...), D floats, written rounded to
// T into slot `slot` of the cache, which must be one of the `width` slots attended over.
template <class T>
static int attend(const float* q, int64_t B, int64_t H, int64_t D, int64_t qsb, int64_t qsh, T* k, T* v,
                  int64_t ksb, int64_t ksh, int64_t kst, int64_t vsb, int64_t vsh, int64_t width, const bool* mask,
                  int64_t msb, int64_t mst, float scale, float* z, int64_t zsb, int64_t zsh, int threads,
                  const float* kn = nullptr, const float* vn = nullptr, int64_t nsb = 0, int64_t nsh = 0,
                  int64_t slot = 0) {
  if (kn != nullptr && (slot < 0 || slot >= width)) return 1;
  const int64_t pairs = B * H;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, pairs)));
#pragma omp parallel num_threads(threads)
  {
    thread_local std::vector<float> scores;
    if (static_cast<int64_t>(scores.size()) < width) scores.resize(width);
    const int t = omp_get_thread_num(), T_ = omp_get_num_threads();
    for (int64_t i = pairs * t / T_; i < pairs * (t + 1) / T_; ++i) {
      const int64_t b = i / H, h = i % H;
      if (kn != nullptr) {
        T* kt = k + b * ksb + h * ksh + slot * kst;
        T* vt = v + b * vsb + h * vsh + slot * kst;
        const float *ks = kn + b * nsb + h * nsh, *vs = vn + b * nsb + h * nsh;
        for (int64_t d = 0; d < D; ++d) {
          narrow(ks[d], kt + d);
          narrow(vs[d], vt + d);
        }
      }
      attend_one(q + b * qsb + h * qsh, k + b * ksb + h * ksh, v + b * vsb + h * vsh, kst, width, D,
                 mask ? mask + b * msb : nullptr, mst, scale, scores.data(), z + b * zsb + h * zsh);
    }
  }
  return 0;
}

extern "C" {
// z (fp32, [batch, heads] of head_dim with strides zsb, zsh) = attention of q (fp32, strides qsb, qsh) over slots
// [0, width) of the keys k and values v (strides ksb, ksh, kst and vsb, vsh, kst: the same slot stride), the
// visible ones where mask (bool, strides msb, mst; null: all). Returns 0.
// gpt2fn_attend_append: the same after writing each pair's new key and value (kn, vn: fp32, strides nsb, nsh) into
// slot *slot of k and v (rounded to T). Returns 0, or 1 (nothing done) where *slot is not in [0, width).
#define GPT2FN_ATTEND(name, T)                                                                                   \
  int gpt2fn_attend_##name(const float* q, int64_t B, int64_t H, int64_t D, int64_t qsb, int64_t qsh,           \
                           const void* k, const void* v, int64_t ksb, int64_t ksh, int64_t kst, int64_t vsb,     \
                           int64_t vsh, int64_t width, const bool* mask, int64_t msb, int64_t mst, float scale,  \
                           float* z, int64_t zsb, int64_t zsh, int threads) {                                    \
    return attend(q, B, H, D, qsb, qsh, static_cast<T*>(const_cast<void*>(k)),                                 \
                  static_cast<T*>(const_cast<void*>(v)), ksb, ksh, kst, vsb, vsh, width, mask, msb, mst, scale, z,  \
                  zsb, zsh, threads);                                                                            \
  }                                                                                                              \
  int gpt2fn_attend_append_##name(const float* q, int64_t B, int64_t H, int64_t D, int64_t qsb, int64_t qsh,    \
                                  void* k, void* v, int64_t ksb, int64_t ksh, int64_t kst, int64_t vsb,          \
                                  int64_t vsh, int64_t width, const bool* mask, int64_t msb, int64_t mst,        \
                                  float scale, float* z, int64_t zsb, int64_t zsh, int threads, const float* kn,  \
                                  const float* vn, int64_t nsb, int64_t nsh, const int64_t* slot) {              \
    return attend(q, B, H, D, qsb, qsh, static_cast<T*>(k), static_cast<T*>(v), ksb, ksh, kst, vsb, vsh, width,  \
                  mask, msb, mst, scale, z, zsb, zsh, threads, kn, vn, nsb, nsh, *slot);                         \
  }
GPT2FN_ATTEND(f32, float)
GPT2FN_ATTEND(bf16, bf16)
#if GPT2FN_F16
GPT2FN_ATTEND(f16, _Float16)
#endif
#undef GPT2FN_ATTEND
}
