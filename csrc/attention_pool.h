// Shared arithmetic of the fused attention pooling operator.
//
// Everything here is compiled for the host (the CPU kernels, every instruction-set path) and for
// the device (the CUDA kernels), so the CPU tests exercise the math the GPU runs: ONE activation
// (sl_tanh: the rational tanh below for float32, the exact tanh for float64), ONE stable-softmax
// merge (SoftmaxState), and the backward terms. The kernels themselves only index, move data and
// reduce. Host-only declarations (input checks) live in checks.h.
//
// Forward, per utterance b with n = lengths[b] valid positions:
//   e_i = u . tanh(W a_i + bias),  alpha = softmax(lam * e) over i < n (0 elsewhere),
//   context = sum_i alpha_i a_i.
// Backward, given dc = dL/dcontext and dalpha = dL/dalpha:
//   s_i = dc . a_i + dalpha_i,  S = sum_k alpha_k s_k,  de_i = lam alpha_i (s_i - S),
//   h_i = tanh(W a_i + bias),  dz_i = de_i u (1 - h_i^2),
//   du = sum_i de_i h_i,  dW = sum_i dz_i a_i^T,  dbias = sum_i dz_i,  da_i = alpha_i dc + W^T dz_i.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SL_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
// always_inline: the CPU kernels call these from functions compiled for AVX2 / AVX-512, with vector
// arguments; inlining them is what keeps vectors from crossing calls between instruction sets.
#define SL_HOST_DEVICE inline __attribute__((always_inline))
#else
#define SL_HOST_DEVICE inline
#endif

namespace ser_lightning {

// tanh without libm: Eigen's rational approximation (generic_fast_tanh_float), a 13/6-degree
// odd/even polynomial ratio on x clamped to +-7.90531110763549805 (where it reaches 1), and x itself
// for |x| < 4e-4. Max error vs the exact tanh over every finite float32: 7 ulp / 4.1e-7 absolute.
// Branch-free, so it vectorises. Written for any V with float arithmetic, comparisons and ?:
// (float, or a GCC/Clang vector of floats in the CPU kernels). The CPU build disables FMA
// contraction (-ffp-contract=off), so every CPU path (scalar or any vector width) rounds each
// operation the same way and gives bit-identical results; nvcc contracts Horner steps into FMAs (a
// few ulp apart). Rounding, with or without any contraction: within 21 ulp of the exact rational at
// the float32 x*x (derived and checked over a dense grid in tests/test_ops.py, TANH_ULPS; measured
// 5.5 ulp without FMAs, 3.9 ulp with every step fused).
template <typename V>
SL_HOST_DEVICE V tanh_rational(V x) {
  const V clamp = V{} + 7.90531110763549805f, zero = V{};
  const V xc = x > clamp ? clamp : (x < -clamp ? -clamp : x);
  const V x2 = xc * xc;
  V p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = x2 * p + -8.60467152213735e-11f;
  p = x2 * p + 5.12229709037114e-08f;
  p = x2 * p + 1.48572235717979e-05f;
  p = x2 * p + 6.37261928875436e-04f;
  p = x2 * p + 4.89352455891786e-03f;
  p = xc * p;
  V q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = x2 * q + 2.26843463243900e-03f;
  q = x2 * q + 4.89352518554385e-03f;
  const V ax = x < zero ? -x : x;
  return ax < V{} + 4e-4f ? x : p / q;
}

// The activation of every path. float64 keeps the exact tanh (gradcheck compares against finite
// differences); float32 (and the float32 accumulation of float16/bfloat16 on CUDA) uses the
// rational one, on the CPU and on the GPU alike.
SL_HOST_DEVICE float sl_tanh(float x) { return tanh_rational(x); }
SL_HOST_DEVICE double sl_tanh(double x) { return ::tanh(x); }
SL_HOST_DEVICE float sl_exp(float x) { return expf(x); }
SL_HOST_DEVICE double sl_exp(double x) { return ::exp(x); }

template <typename acc_t>
SL_HOST_DEVICE acc_t neg_infinity() { return -static_cast<acc_t>(INFINITY); }

// tanh(z + bias): the activation of one projected component.
template <typename acc_t>
SL_HOST_DEVICE acc_t activation(acc_t z, acc_t bias) { return sl_tanh(z + bias); }

// Running (max, sum of exp(x - max)) of a stable softmax. Every path builds the softmax of an
// utterance by merging partials (one per tile, wave or utterance) into an empty state: the CPU
// kernels merge once per utterance or wave, the CUDA merge kernel once per tile.
template <typename acc_t>
struct SoftmaxState {
  acc_t max;
  acc_t sum;

  SL_HOST_DEVICE static SoftmaxState empty() { return {neg_infinity<acc_t>(), acc_t(0)}; }

  // Merge a partial (other_max, other_sum); writes the factor for this side's old exp-weighted
  // accumulators (the context sums) to *scale_self and for the other side's to *scale_other. An
  // empty side (max = -inf) gets 0.
  SL_HOST_DEVICE void merge(acc_t other_max, acc_t other_sum, acc_t* scale_self, acc_t* scale_other) {
    const acc_t m = max > other_max ? max : other_max;
    *scale_self = max == neg_infinity<acc_t>() ? acc_t(0) : sl_exp(max - m);
    *scale_other = other_max == neg_infinity<acc_t>() ? acc_t(0) : sl_exp(other_max - m);
    sum = sum * *scale_self + other_sum * *scale_other;
    max = m;
  }

  // Normalised weight of a position with scaled score x once all positions are merged.
  SL_HOST_DEVICE acc_t weight(acc_t x) const { return sl_exp(x - max) / sum; }
};

// de_i = lam alpha_i (s_i - S): gradient of the loss with respect to the unscaled score e_i.
template <typename acc_t>
SL_HOST_DEVICE acc_t score_grad(acc_t lam, acc_t alpha, acc_t s, acc_t s_mean) {
  return lam * alpha * (s - s_mean);
}

// dz_{i,d} = de_i u_d (1 - h_{i,d}^2): gradient with respect to the pre-activation z_{i,d} + bias_d.
// Also instantiated for vectors of floats by the CPU kernels.
template <typename acc_t>
SL_HOST_DEVICE acc_t preactivation_grad(acc_t de, acc_t u, acc_t h) { return de * u * (1 - h * h); }

}  // namespace ser_lightning
