// The vector types and loads shared by the native kernels (affine.cpp, attend.cpp): VL floats per register,
// the stored element types (fp32, bf16 as its bits, fp16, int8), and widening of VL of them to fp32 in registers.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
constexpr int VL = 16, NREG = 32;
#elif defined(__AVX__)
constexpr int VL = 8, NREG = 16;
#else
constexpr int VL = 4, NREG = 16;
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));
typedef uint16_t vbf __attribute__((vector_size(VL * 2), aligned(2)));
#ifdef __FLT16_MAX__
typedef _Float16 vhf __attribute__((vector_size(VL * 2), aligned(2)));
#endif
typedef int8_t vq __attribute__((vector_size(VL), aligned(1)));

// The stored element types: fp32, bf16 (its bits), fp16, int8 (with one fp32 scale per output column).
struct bf16 { uint16_t bits; };

// Unaligned loads and stores through the ISA's intrinsics: GCC expands a memcpy of a 256-bit vector as two 128-bit
// moves through the stack under -mtune=znver3 (a store-forwarding stall on every load: on an AMD EPYC 7003 the fp32
// 1-row products took 2.7x and the 8-row tied head 9x their time, docs/performance.md run 6).
static inline vf load(const float* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_loadu_ps(p);
#elif defined(__AVX__)
  return (vf)_mm256_loadu_ps(p);
#elif defined(__SSE2__)
  return (vf)_mm_loadu_ps(p);
#else
  vf v; std::memcpy(&v, p, sizeof v); return v;
#endif
}
static inline void store(float* p, vf v) {
#if defined(__AVX512F__)
  _mm512_storeu_ps(p, (__m512)v);
#elif defined(__AVX__)
  _mm256_storeu_ps(p, (__m256)v);
#elif defined(__SSE2__)
  _mm_storeu_ps(p, (__m128)v);
#else
  std::memcpy(p, &v, sizeof v);
#endif
}
// s in every lane, one broadcast. Not `vf{} + s`: GCC keeps that as an add to a zero register then a broadcast, an
// extra instruction and a register the 16-register (AVX2) blocks do not have: 4 rows x 3 vectors of accumulators
// spilled one to the stack, and the 8-row products ran at a third of the FMA peak (docs/performance.md run 7).
static inline vf splat(float s) {
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(s);
#elif defined(__AVX__)
  return (vf)_mm256_set1_ps(s);
#elif defined(__SSE2__)
  return (vf)_mm_set1_ps(s);
#else
  vf v;
  for (int i = 0; i < VL; ++i) v[i] = s;
  return v;
#endif
}

// a * b + c with one rounding where the CPU has FMA. Spelled out rather than left to -ffp-contract: under
// -mtune=znver* GCC keeps a loop-carried accumulation as a multiply and an add ("avoid FMA chains") in some loops
// and fuses it in others, so the same sum would round differently in different kernels (the tail of a row, a
// smaller row block) and a row's bits would depend on the thread count and the batch.
static inline vf madd(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__AVX__) && defined(__FMA__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
static inline float madd1(float a, float b, float c) {
#if defined(__FMA__) || defined(__aarch64__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// VL stored elements widened to fp32 in registers.
static inline vf widen(const float* p) { return load(p); }
// Widening through intrinsics where the CPU has the instruction: GCC splits __builtin_convertvector from 16-bit
// lanes into halves (bf16) or, for _Float16 without AVX512-FP16, into one vcvtph2ps per element.
static inline vf widen(const bf16* p) {
#if defined(__AVX512F__)
  __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  return (vf)u;
#elif defined(__AVX2__)
  __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  return (vf)u;
#else
  vbf h; std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
}
#ifdef __FLT16_MAX__  // the compiler knows _Float16 (GCC 12+, clang 15+ on x86-64 and arm64)
#define GPT2FN_F16 1
static inline vf widen(const _Float16* p) {
#if defined(__AVX512F__)
  __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (vf)f;
#elif defined(__F16C__) && defined(__AVX__)
  __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (vf)f;
#else
  vhf h; std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, vf);
#endif
}
static inline float widen1(_Float16 v) { return float(v); }
#else
#define GPT2FN_F16 0
#endif
// int8 -> fp32: GCC scalarizes __builtin_convertvector from int8 lanes, so the sign extension is spelled out
static inline vf widen(const int8_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  vf f;
  for (int i = 0; i < VL; ++i) f[i] = float(p[i]);
  return f;
#endif
}
static inline float widen1(float v) { return v; }
static inline float widen1(bf16 v) { uint32_t u = uint32_t(v.bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
static inline float widen1(int8_t v) { return float(v); }
