// Vectors of one instruction set for the per-position CPU code (isa_kernels.h).
//
// Included by exactly one isa_*.cpp, which defines one of SL_ISA_AVX512, SL_ISA_AVX2 or
// SL_ISA_BASELINE first. Every function here and in isa_kernels.h carries SL_ISA_FN: the target
// attribute of that instruction set (so no translation unit needs machine flags, and code for a
// wider set never leaks into another path) and always_inline (vectors never cross a call).
//
// VecOps<T>::type is the register type, usable with the GCC/Clang vector operators (+, *, <, ?:),
// so the shared math of attention_pool.h runs on it unchanged. fmadd is an explicit fused
// multiply-add where the set has one (the build disables implicit contraction, see
// attention_pool.h). The register blocking of the small GEMMs (kPositions rows of x in flight
// against kBlockVecs vectors of a matrix row) is chosen so the accumulators, the matrix block and
// one broadcast fit the register file: 32 registers for AVX-512 and NEON, 16 for AVX2 and SSE2.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) || defined(__clang__)
#define SL_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SL_ALWAYS_INLINE inline
#endif

#if defined(SL_ISA_AVX512)
#include <immintrin.h>
#define SL_ISA_NAME avx512
#define SL_ISA_FN __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))) SL_ALWAYS_INLINE
#define SL_ISA_ENTRY __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#elif defined(SL_ISA_AVX2)
#include <immintrin.h>
#define SL_ISA_NAME avx2
#define SL_ISA_FN __attribute__((target("avx2,fma"))) SL_ALWAYS_INLINE
#define SL_ISA_ENTRY __attribute__((target("avx2,fma")))
#elif defined(SL_ISA_BASELINE)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <emmintrin.h>
#define SL_BASELINE_SSE2 1
#elif defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
#include <arm_neon.h>
#define SL_BASELINE_NEON 1
#else
#define SL_BASELINE_SCALAR 1
#endif
#define SL_ISA_NAME baseline
#define SL_ISA_FN SL_ALWAYS_INLINE
#define SL_ISA_ENTRY
#else
#error "define SL_ISA_AVX512, SL_ISA_AVX2 or SL_ISA_BASELINE before including cpu/vec.h"
#endif

namespace ser_lightning::cpu::SL_ISA_NAME {

template <typename T>
struct VecOps;

#if defined(SL_ISA_AVX512)

template <>
struct VecOps<float> {
  using type = __m512;
  static constexpr int kLanes = 16, kPositions = 8, kBlockVecs = 2;
  SL_ISA_FN static type zero() { return _mm512_setzero_ps(); }
  SL_ISA_FN static type set1(float x) { return _mm512_set1_ps(x); }
  SL_ISA_FN static type load(const float* p) { return _mm512_loadu_ps(p); }
  SL_ISA_FN static void store(float* p, type v) { _mm512_storeu_ps(p, v); }
  SL_ISA_FN static type fmadd(type a, type b, type c) { return _mm512_fmadd_ps(a, b, c); }
  SL_ISA_FN static float hsum(type v) {
    __m256 half[2];  // the two 256-bit halves (memcpy: GCC 12's extract intrinsics warn under -Wall)
    std::memcpy(half, &v, sizeof v);
    const __m256 s8 = _mm256_add_ps(half[0], half[1]);
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
  }
};
template <>
struct VecOps<double> {
  using type = __m512d;
  static constexpr int kLanes = 8, kPositions = 8, kBlockVecs = 2;
  SL_ISA_FN static type zero() { return _mm512_setzero_pd(); }
  SL_ISA_FN static type set1(double x) { return _mm512_set1_pd(x); }
  SL_ISA_FN static type load(const double* p) { return _mm512_loadu_pd(p); }
  SL_ISA_FN static void store(double* p, type v) { _mm512_storeu_pd(p, v); }
  SL_ISA_FN static type fmadd(type a, type b, type c) { return _mm512_fmadd_pd(a, b, c); }
  SL_ISA_FN static double hsum(type v) {
    __m256d half[2];
    std::memcpy(half, &v, sizeof v);
    const __m256d s4 = _mm256_add_pd(half[0], half[1]);
    const __m128d s2 = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)));
  }
};

#elif defined(SL_ISA_AVX2)

template <>
struct VecOps<float> {
  using type = __m256;
  static constexpr int kLanes = 8, kPositions = 4, kBlockVecs = 2;
  SL_ISA_FN static type zero() { return _mm256_setzero_ps(); }
  SL_ISA_FN static type set1(float x) { return _mm256_set1_ps(x); }
  SL_ISA_FN static type load(const float* p) { return _mm256_loadu_ps(p); }
  SL_ISA_FN static void store(float* p, type v) { _mm256_storeu_ps(p, v); }
  SL_ISA_FN static type fmadd(type a, type b, type c) { return _mm256_fmadd_ps(a, b, c); }
  SL_ISA_FN static float hsum(type v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
};
template <>
struct VecOps<double> {
  using type = __m256d;
  static constexpr int kLanes = 4, kPositions = 4, kBlockVecs = 2;
  SL_ISA_FN static type zero() { return _mm256_setzero_pd(); }
  SL_ISA_FN static type set1(double x) { return _mm256_set1_pd(x); }
  SL_ISA_FN static type load(const double* p) { return _mm256_loadu_pd(p); }
  SL_ISA_FN static void store(double* p, type v) { _mm256_storeu_pd(p, v); }
  SL_ISA_FN static type fmadd(type a, type b, type c) { return _mm256_fmadd_pd(a, b, c); }
  SL_ISA_FN static double hsum(type v) {
    const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
};

#elif defined(SL_BASELINE_SSE2)

// No FMA: a multiply and an add, one more register per product.
template <>
struct VecOps<float> {
  using type = __m128;
  static constexpr int kLanes = 4, kPositions = 4, kBlockVecs = 2;
  SL_ISA_FN static type zero() { return _mm_setzero_ps(); }
  SL_ISA_FN static type set1(float x) { return _mm_set1_ps(x); }
  SL_ISA_FN static type load(const float* p) { return _mm_loadu_ps(p); }
  SL_ISA_FN static void store(float* p, type v) { _mm_storeu_ps(p, v); }
  SL_ISA_FN static type fmadd(type a, type b, type c) { return a * b + c; }
  SL_ISA_FN static float hsum(type v) {
    const __m128 t = _mm_add_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
  }
};
template <>
struct VecOps<double> {
  using type = __m128d;
  static constexpr int kLanes = 2, kPositions = 4, kBlockVecs = 2;
  SL_ISA_FN static type zero() { return _mm_setzero_pd(); }
  SL_ISA_FN static type set1(double x) { return _mm_set1_pd(x); }
  SL_ISA_FN static type load(const double* p) { return _mm_loadu_pd(p); }
  SL_ISA_FN static void store(double* p, type v) { _mm_storeu_pd(p, v); }
  SL_ISA_FN static type fmadd(type a, type b, type c) { return a * b + c; }
  SL_ISA_FN static double hsum(type v) { return _mm_cvtsd_f64(_mm_add_sd(v, _mm_unpackhi_pd(v, v))); }
};

#elif defined(SL_BASELINE_NEON)

template <>
struct VecOps<float> {
  using type = float32x4_t;
  static constexpr int kLanes = 4, kPositions = 4, kBlockVecs = 4;
  SL_ISA_FN static type zero() { return vdupq_n_f32(0.f); }
  SL_ISA_FN static type set1(float x) { return vdupq_n_f32(x); }
  SL_ISA_FN static type load(const float* p) { return vld1q_f32(p); }
  SL_ISA_FN static void store(float* p, type v) { vst1q_f32(p, v); }
  SL_ISA_FN static type fmadd(type a, type b, type c) { return vfmaq_f32(c, a, b); }
  SL_ISA_FN static float hsum(type v) { return vaddvq_f32(v); }
};
template <>
struct VecOps<double> {
  using type = float64x2_t;
  static constexpr int kLanes = 2, kPositions = 4, kBlockVecs = 4;
  SL_ISA_FN static type zero() { return vdupq_n_f64(0.0); }
  SL_ISA_FN static type set1(double x) { return vdupq_n_f64(x); }
  SL_ISA_FN static type load(const double* p) { return vld1q_f64(p); }
  SL_ISA_FN static void store(double* p, type v) { vst1q_f64(p, v); }
  SL_ISA_FN static type fmadd(type a, type b, type c) { return vfmaq_f64(c, a, b); }
  SL_ISA_FN static double hsum(type v) { return vaddvq_f64(v); }
};

#else  // SL_BASELINE_SCALAR: any compiler, any target

template <typename T>
struct VecOps {
  using type = T;
  static constexpr int kLanes = 1, kPositions = 2, kBlockVecs = 4;
  SL_ISA_FN static type zero() { return T(0); }
  SL_ISA_FN static type set1(T x) { return x; }
  SL_ISA_FN static type load(const T* p) { return *p; }
  SL_ISA_FN static void store(T* p, type v) { *p = v; }
  SL_ISA_FN static type fmadd(type a, type b, type c) { return a * b + c; }
  SL_ISA_FN static T hsum(type v) { return v; }
};

#endif

}  // namespace ser_lightning::cpu::SL_ISA_NAME
