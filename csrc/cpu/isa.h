// The interface of the per-instruction-set CPU code (isa_kernels.h, compiled once per path by
// isa_*.cpp): plain structs and function pointers, no ATen, so those files stay quick to compile.
#pragma once

#include <cstdint>

namespace ser_lightning::cpu {

enum class Capability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

constexpr int64_t kNarrowMax = 64;

// One narrow problem with C and D padded to N (a multiple of the path's block width): the padding
// entries of the weights, bias and u are 0, so they add nothing.
template <typename T>
struct NarrowProblem {
  int64_t L, C, D, N;
  const T* a;          // (B, L, C)
  const int64_t* len;  // (B,)
  const T* wt;         // (C, N): wt[c N + d] = W[d, c], 0 for d >= D
  const T* wp;         // (D, N): wp[d N + c] = W[d, c], 0 for c >= C (backward only)
  const T* bias;       // (N,), 0 for d >= D
  const T* u;          // (N,), 0 for d >= D
  T lam;
};

// Per-thread sums of the parameter gradients, each padded to N: dW^T (C, N), dbias (N), du (N).
template <typename T>
struct NarrowGrads {
  T* wt;
  T* bias;
  T* u;
};

template <typename T>
struct IsaKernels {
  int block;  // N must be a multiple of this (elements)
  // Utterances [b0, b1): context (B, C) and alpha (B, L).
  void (*narrow_forward)(const NarrowProblem<T>& p, int64_t b0, int64_t b1, T* context, T* alpha);
  // Utterances [b0, b1): grad_a rows, parameter gradients added to g; dz_buf (L, N) and de_buf (L) are scratch.
  void (*narrow_backward)(const NarrowProblem<T>& p, int64_t b0, int64_t b1, const T* grad_context,
                          const T* grad_alpha, const T* alpha, T* grad_a, const NarrowGrads<T>& g, T* dz_buf,
                          T* de_buf);
  void (*tanh)(T* x, int64_t n);
  T (*dot)(const T* x, const T* y, int64_t n);
  // y += w x
  void (*axpy)(T* y, T w, const T* x, int64_t n);
  // Rows r of h (rows, D) hold tanh(W a_r + bias); turns them into dz_r = de_r u (1 - h_r^2) in place
  // and adds de_r h_r to du and dz_r to db. Rows with de_r = 0 become 0.
  void (*dz_rows)(T* h, const T* de, const T* u, int64_t rows, int64_t D, T* du, T* db);
};

// What each isa_*.cpp defines (kAvx512Table, kAvx2Table, kBaselineTable).
struct IsaTable {
  IsaKernels<float> f32;
  IsaKernels<double> f64;
};

}  // namespace ser_lightning::cpu
