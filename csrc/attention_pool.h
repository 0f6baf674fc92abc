// Shared arithmetic of the fused attention pooling operator.
//
// The scalar formulas (activation, stable-softmax merge and weights, backward terms) live here as
// small inline functions compiled for the host (CPU kernel) and the device (CUDA kernel), so the
// CPU tests exercise the math the GPU runs. The kernels themselves move data, index and reduce;
// GEMMs are ATen/BLAS calls in the CPU kernel for wide problems (and cuBLAS in the CUDA backward);
// the CPU kernel for narrow problems (small C and D) is self-contained and uses fast_tanh below.
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

#ifdef __CUDACC__
#define SL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SL_HOST_DEVICE inline
#endif

namespace ser_lightning {

SL_HOST_DEVICE float sl_tanh(float x) { return tanhf(x); }
SL_HOST_DEVICE double sl_tanh(double x) { return ::tanh(x); }

// tanh for float32 without libm: Eigen's rational approximation (generic_fast_tanh_float), a
// 13/6-degree odd/even polynomial ratio on x clamped to +-7.90531110763549805 (where it reaches 1),
// and x itself for |x| < 4e-4. Max error vs the exact tanh, measured over every finite float32:
// 7 ulp / 4.1e-7 absolute (5 ulp / 2.9e-7 when compiled with FMA contraction). Branch-free, so loops
// over it vectorise.
// Written for any V with float arithmetic, comparisons and ?: (float, or a GCC/Clang vector of
// floats in the CPU kernel); constants are made as V{} + c to broadcast them.
template <typename V>
SL_HOST_DEVICE V fast_tanh_rational(V x) {
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
SL_HOST_DEVICE float fast_tanh(float x) { return fast_tanh_rational(x); }
// float64 keeps the exact tanh (gradcheck compares against finite differences).
SL_HOST_DEVICE double fast_tanh(double x) { return ::tanh(x); }
SL_HOST_DEVICE float sl_exp(float x) { return expf(x); }
SL_HOST_DEVICE double sl_exp(double x) { return ::exp(x); }

template <typename acc_t>
SL_HOST_DEVICE acc_t neg_infinity() { return -static_cast<acc_t>(INFINITY); }

// tanh(z + bias): the activation of one projected component.
template <typename acc_t>
SL_HOST_DEVICE acc_t activation(acc_t z, acc_t bias) { return sl_tanh(z + bias); }

// Running (max, sum of exp(x - max)) of a stable softmax, merged across tiles of positions.
// Merging another partial (m, s) returns the factors that rescale this partial's and the other
// partial's exp-weighted sums (the context accumulators) to the new common maximum.
template <typename acc_t>
struct SoftmaxState {
  acc_t max;
  acc_t sum;

  SL_HOST_DEVICE static SoftmaxState empty() { return {neg_infinity<acc_t>(), acc_t(0)}; }

  // Merge a partial (other_max, other_sum); writes the factor for this side's old accumulators to
  // *scale_self and for the other side's to *scale_other. An empty side (max = -inf) gets 0.
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
template <typename acc_t>
SL_HOST_DEVICE acc_t preactivation_grad(acc_t de, acc_t u, acc_t h) { return de * u * (1 - h * h); }

}  // namespace ser_lightning

#include <ATen/core/Tensor.h>

namespace ser_lightning {

// Host-side checks shared by the CPU and CUDA registrations; messages name the argument.
void check_forward_inputs(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& u, double lam, const at::Tensor& lengths);
void check_backward_inputs(const at::Tensor& grad_context, const at::Tensor& grad_alpha, const at::Tensor& a,
                           const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& u,
                           const at::Tensor& alpha, double lam, const at::Tensor& lengths);

}  // namespace ser_lightning
