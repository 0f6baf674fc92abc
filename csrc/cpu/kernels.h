// The CPU kernels of the fused attention pooling: what attention_pool.cpp calls.
//
// Two paths. Narrow (max(C, D) <= kNarrowMax, the models' attention layers): one pass per utterance,
// no ATen call inside (narrow.cpp around the per-instruction-set code of isa_kernels.h). Wide:
// ATen/BLAS GEMMs over the valid positions in waves (wide.cpp). Both take contiguous inputs whose
// lengths were checked, and write every element of their outputs.
//
// Instruction sets. The per-position code (narrow path; tanh, dot and the dz rows of the wide path)
// is compiled once per instruction set the target has (x86-64: avx512, avx2, default = SSE2;
// aarch64: default = NEON; elsewhere: default = portable scalar code), each with its own vector
// width and register blocking, and chosen at run time: the best the CPU supports, or the one named
// by SER_LIGHTNING_CPU_CAPABILITY (read once, on first use: the Python package asks at import), or
// set_capability().
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/isa.h"

namespace ser_lightning::cpu {

// ---------------------------------------------------------------------------------------------
// Instruction-set paths

const char* capability_name(Capability capability);
// Paths compiled into this build, best first.
std::vector<Capability> compiled_capabilities();
bool cpu_supports(Capability capability);
Capability active_capability();
// Throws (naming the option) when `name` is unknown or this CPU lacks it.
void set_capability(const std::string& name);

// ---------------------------------------------------------------------------------------------
// Entry points (explicitly instantiated for float and double)

inline bool is_narrow(int64_t channels, int64_t dim) { return (channels > dim ? channels : dim) <= kNarrowMax; }

template <typename T>
void narrow_forward(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& u,
                    double lam, const at::Tensor& lengths, at::Tensor& context, at::Tensor& alpha);
template <typename T>
void narrow_backward(const at::Tensor& grad_context, const at::Tensor& grad_alpha, const at::Tensor& a,
                     const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& u, const at::Tensor& alpha,
                     double lam, const at::Tensor& lengths, at::Tensor& grad_a, at::Tensor& grad_weight,
                     at::Tensor& grad_bias, at::Tensor& grad_u);
template <typename T>
void wide_forward(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& u,
                  double lam, const at::Tensor& lengths, at::Tensor& context, at::Tensor& alpha);
template <typename T>
void wide_backward(const at::Tensor& grad_context, const at::Tensor& grad_alpha, const at::Tensor& a,
                   const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& u, const at::Tensor& alpha,
                   double lam, const at::Tensor& lengths, at::Tensor& grad_a, at::Tensor& grad_weight,
                   at::Tensor& grad_bias, at::Tensor& grad_u);

// x = sl_tanh(x) in place with the active path's code (the wide path's activation; test op _tanh).
template <typename T>
void tanh_inplace(T* x, int64_t n);

template <typename T>
const IsaKernels<T>& isa_kernels(Capability capability);
// The active path's kernels.
template <typename T>
const IsaKernels<T>& active_kernels() {
  return isa_kernels<T>(active_capability());
}

}  // namespace ser_lightning::cpu
