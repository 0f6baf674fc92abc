// The per-position CPU code of one instruction set: the narrow path, and the vector helpers of the
// wide path. Included once by each isa_*.cpp, after it picks the instruction set (see cpu/vec.h);
// everything here lives in that set's namespace and is compiled for it.
//
// Narrow path (max(C, D) <= kNarrowMax, the models' attention layers): one pass per utterance, no
// ATen call, no temporaries beyond an (L, N) scratch per thread. C and D are padded to N (a multiple
// of the block width kBlock) with zero weights, so blocks never need a remainder. All three products
// are the same register-blocked GEMM (gemm_block): P rows of a left operand against a block of
// kBlockVecs vectors of right-hand matrix rows, accumulated in registers:
//   projection   z_i = bias + W a_i               rows of x: positions of a,  matrix: W^T (C, N)
//   input grad   da_i = alpha_i dc + W^T dz_i     rows of x: positions of dz, matrix: W (D, N)
//   weight grad  dW^T[c] += sum_i a_{i,c} dz_i    rows of x: columns of a,    matrix: dz (n, N)
// P starts at the path's kPositions and halves for the remainder (for_blocks), so every step keeps
// P x kBlockVecs independent accumulators in flight. Forward: scores (projection, tanh, u-dot), the
// softmax (SoftmaxState), the context (axpy). Backward: s_i and de_i; per block of positions the
// projection again (no saved activation), dz into the scratch, the du and dbias sums, da; then dW^T.
#pragma once

#include <algorithm>
#include <cstdint>

#include "attention_pool.h"
#include "cpu/isa.h"
#include "cpu/vec.h"

namespace ser_lightning::cpu::SL_ISA_NAME {

template <typename T>
using Vec = typename VecOps<T>::type;
// Elements per column block of the small GEMMs; N is a multiple of it.
template <typename T>
constexpr int kBlock = VecOps<T>::kLanes * VecOps<T>::kBlockVecs;

SL_ISA_FN Vec<float> vec_tanh(Vec<float> x) { return tanh_rational(x); }
SL_ISA_FN Vec<double> vec_tanh(Vec<double> x) {  // the exact tanh, lane by lane
  double lanes[VecOps<double>::kLanes];
  VecOps<double>::store(lanes, x);
  for (double& v : lanes) v = sl_tanh(v);
  return VecOps<double>::load(lanes);
}

// out[k][v] += sum_{r < rows} x[k xk + r xr] * m[r ld + v kLanes]: P rows of x against one block of
// kBlockVecs vectors of each of `rows` matrix rows (leading dimension ld).
template <typename T, int P, int VB>
SL_ISA_FN void gemm_block(const T* __restrict__ x, int64_t xk, int64_t xr, const T* __restrict__ m, int64_t ld,
                          int64_t rows, Vec<T> (&out)[P][VB]) {
  using O = VecOps<T>;
  Vec<T> acc[P][VB];  // a local copy: GCC then keeps it in registers through the loop (no store per row)
  for (int k = 0; k < P; ++k)
    for (int v = 0; v < VB; ++v) acc[k][v] = out[k][v];
  for (int64_t r = 0; r < rows; ++r) {
    Vec<T> w[VB];
    for (int v = 0; v < VB; ++v) w[v] = O::load(m + r * ld + v * O::kLanes);
    for (int k = 0; k < P; ++k) {
      const Vec<T> xb = O::set1(x[k * xk + r * xr]);
      for (int v = 0; v < VB; ++v) acc[k][v] = O::fmadd(xb, w[v], acc[k][v]);
    }
  }
  for (int k = 0; k < P; ++k)
    for (int v = 0; v < VB; ++v) out[k][v] = acc[k][v];
}

// z[k] = bias + W a_k, in the column block of N starting at j: the pre-activations of the P
// positions whose rows of a start at a_rows (C apart).
template <typename T, int P, int VB>
SL_ISA_FN void project_block(const NarrowProblem<T>& p, const T* a_rows, int64_t j, Vec<T> (&z)[P][VB]) {
  using O = VecOps<T>;
  for (int v = 0; v < VB; ++v) {
    const Vec<T> b = O::load(p.bias + j + v * O::kLanes);
    for (int k = 0; k < P; ++k) z[k][v] = b;
  }
  gemm_block<T, P, VB>(a_rows, p.C, 1, p.wt + j, p.N, p.C, z);
}

// step.run<P>(i) for i = start, start + P, ... while P rows remain, then P / 2, ..., 1.
template <int P, typename Step>
SL_ISA_FN void for_blocks(const Step& step, int64_t i, int64_t n) {
  for (; i + P <= n; i += P) step.template run<P>(i);
  if constexpr (P > 1) for_blocks<P / 2>(step, i, n);
}

template <typename T>
SL_ISA_FN T dot(const T* __restrict__ x, const T* __restrict__ y, int64_t n) {
  using O = VecOps<T>;
  constexpr int W = O::kLanes;
  Vec<T> acc[4] = {O::zero(), O::zero(), O::zero(), O::zero()};
  int64_t k = 0;
  for (; k + 4 * W <= n; k += 4 * W)
    for (int j = 0; j < 4; ++j) acc[j] = O::fmadd(O::load(x + k + j * W), O::load(y + k + j * W), acc[j]);
  for (; k + W <= n; k += W) acc[0] = O::fmadd(O::load(x + k), O::load(y + k), acc[0]);
  T total = O::hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
  for (; k < n; ++k) total += x[k] * y[k];
  return total;
}

template <typename T>
SL_ISA_FN void axpy(T* __restrict__ y, T w, const T* __restrict__ x, int64_t n) {
  using O = VecOps<T>;
  constexpr int W = O::kLanes;
  const Vec<T> wv = O::set1(w);
  int64_t k = 0;
  for (; k + W <= n; k += W) O::store(y + k, O::fmadd(wv, O::load(x + k), O::load(y + k)));
  for (; k < n; ++k) y[k] += w * x[k];
}

// ---------------------------------------------------------------------------------------------
// Narrow forward

// Scaled scores lam e_i of positions [i, i + P) into out[i..].
template <typename T>
struct ScoreStep {
  const NarrowProblem<T>& p;
  const T* a_b;
  T* out;

  template <int P>
  SL_ISA_FN void run(int64_t i) const {
    using O = VecOps<T>;
    constexpr int VB = O::kBlockVecs, W = O::kLanes;
    Vec<T> e[P];
    for (int k = 0; k < P; ++k) e[k] = O::zero();
    for (int64_t j = 0; j < p.N; j += kBlock<T>) {
      Vec<T> z[P][VB];
      project_block<T, P, VB>(p, a_b + i * p.C, j, z);
      for (int v = 0; v < VB; ++v) {
        const Vec<T> uv = O::load(p.u + j + v * W);
        for (int k = 0; k < P; ++k) e[k] = O::fmadd(vec_tanh(z[k][v]), uv, e[k]);
      }
    }
    for (int k = 0; k < P; ++k) out[i + k] = p.lam * O::hsum(e[k]);
  }
};

template <typename T>
SL_ISA_FN void forward_utterance(const NarrowProblem<T>& p, int64_t b, T* __restrict__ context,
                                 T* __restrict__ alpha) {
  const int64_t L = p.L, C = p.C, n = p.len[b];
  const T* a_b = p.a + b * L * C;
  T* al = alpha + b * L;
  for_blocks<VecOps<T>::kPositions>(ScoreStep<T>{p, a_b, al}, 0, n);
  SoftmaxState<T> state{*std::max_element(al, al + n), T(0)};
  for (int64_t i = 0; i < n; ++i) state.sum += sl_exp(al[i] - state.max);
  T* ctx = context + b * C;
  std::fill(ctx, ctx + C, T(0));
  for (int64_t i = 0; i < n; ++i) {
    al[i] = state.weight(al[i]);
    axpy(ctx, al[i], a_b + i * C, C);
  }
  std::fill(al + n, al + L, T(0));
}

// ---------------------------------------------------------------------------------------------
// Narrow backward

// Positions [i, i + P): dz into dz_buf, their du and dbias terms into g, their rows of grad_a.
template <typename T>
struct BackwardStep {
  const NarrowProblem<T>& p;
  const T* a_b;
  const T* al;      // alpha of the utterance
  const T* de;      // de_i of the utterance
  const T* dc_pad;  // dc padded to N
  T* dz_buf;        // (L, N)
  T* ga;            // grad_a rows of the utterance
  const NarrowGrads<T>& g;

  template <int P>
  SL_ISA_FN void run(int64_t i) const {
    using O = VecOps<T>;
    constexpr int VB = O::kBlockVecs, W = O::kLanes;
    const int64_t C = p.C, N = p.N;
    for (int64_t j = 0; j < N; j += kBlock<T>) {
      Vec<T> z[P][VB];
      project_block<T, P, VB>(p, a_b + i * C, j, z);
      for (int v = 0; v < VB; ++v) {
        const int64_t col = j + v * W;
        const Vec<T> uv = O::load(p.u + col);
        Vec<T> du = O::load(g.u + col), db = O::load(g.bias + col);
        for (int k = 0; k < P; ++k) {
          const Vec<T> de_k = O::set1(de[i + k]);
          const Vec<T> h = vec_tanh(z[k][v]);
          const Vec<T> dz = preactivation_grad<Vec<T>>(de_k, uv, h);
          O::store(dz_buf + (i + k) * N + col, dz);
          du = O::fmadd(de_k, h, du);
          db = db + dz;
        }
        O::store(g.u + col, du);
        O::store(g.bias + col, db);
      }
    }
    T rows[P][kNarrowMax];  // da rows, padded to N
    for (int64_t j = 0; j < N; j += kBlock<T>) {
      Vec<T> d[P][VB];
      for (int v = 0; v < VB; ++v) {
        const Vec<T> dcv = O::load(dc_pad + j + v * W);
        for (int k = 0; k < P; ++k) d[k][v] = O::set1(al[i + k]) * dcv;
      }
      gemm_block<T, P, VB>(dz_buf + i * N, N, 1, p.wp + j, N, p.D, d);
      for (int k = 0; k < P; ++k)
        for (int v = 0; v < VB; ++v) O::store(rows[k] + j + v * W, d[k][v]);
    }
    for (int k = 0; k < P; ++k) std::copy(rows[k], rows[k] + C, ga + (i + k) * C);
  }
};

// Columns [c, c + P) of a: dW^T[c..] += sum_{i < n} a_{i,c} dz_i.
template <typename T>
struct WeightGradStep {
  const NarrowProblem<T>& p;
  const T* a_b;
  int64_t n;
  const T* dz_buf;
  T* gwt;

  template <int P>
  SL_ISA_FN void run(int64_t c) const {
    using O = VecOps<T>;
    constexpr int VB = O::kBlockVecs, W = O::kLanes;
    for (int64_t j = 0; j < p.N; j += kBlock<T>) {
      Vec<T> acc[P][VB];
      for (int k = 0; k < P; ++k)
        for (int v = 0; v < VB; ++v) acc[k][v] = O::load(gwt + (c + k) * p.N + j + v * W);
      gemm_block<T, P, VB>(a_b + c, 1, p.C, dz_buf + j, p.N, n, acc);
      for (int k = 0; k < P; ++k)
        for (int v = 0; v < VB; ++v) O::store(gwt + (c + k) * p.N + j + v * W, acc[k][v]);
    }
  }
};

template <typename T>
SL_ISA_FN void backward_utterance(const NarrowProblem<T>& p, int64_t b, const T* __restrict__ dc_all,
                                  const T* __restrict__ dalpha_all, const T* __restrict__ alpha_all,
                                  T* __restrict__ grad_a, const NarrowGrads<T>& g, T* __restrict__ dz_buf,
                                  T* __restrict__ de_buf) {
  const int64_t L = p.L, C = p.C, n = p.len[b];
  const T* a_b = p.a + b * L * C;
  const T* al = alpha_all + b * L;
  const T* dc = dc_all + b * C;
  T* ga = grad_a + b * L * C;
  T s_mean = 0;
  for (int64_t i = 0; i < n; ++i) {
    de_buf[i] = dot(dc, a_b + i * C, C) + dalpha_all[b * L + i];  // s_i
    s_mean += al[i] * de_buf[i];
  }
  for (int64_t i = 0; i < n; ++i) de_buf[i] = score_grad<T>(p.lam, al[i], de_buf[i], s_mean);
  T dc_pad[kNarrowMax] = {};
  std::copy(dc, dc + C, dc_pad);
  for_blocks<VecOps<T>::kPositions>(BackwardStep<T>{p, a_b, al, de_buf, dc_pad, dz_buf, ga, g}, 0, n);
  std::fill(ga + n * C, ga + L * C, T(0));
  for_blocks<VecOps<T>::kPositions>(WeightGradStep<T>{p, a_b, n, dz_buf, g.wt}, 0, C);
}

// ---------------------------------------------------------------------------------------------
// Entry points (not inlined; reached through the IsaKernels table)

template <typename T>
SL_ISA_ENTRY void narrow_forward_entry(const NarrowProblem<T>& p, int64_t b0, int64_t b1, T* context, T* alpha) {
  for (int64_t b = b0; b < b1; ++b) forward_utterance(p, b, context, alpha);
}

template <typename T>
SL_ISA_ENTRY void narrow_backward_entry(const NarrowProblem<T>& p, int64_t b0, int64_t b1, const T* grad_context,
                                        const T* grad_alpha, const T* alpha, T* grad_a, const NarrowGrads<T>& g,
                                        T* dz_buf, T* de_buf) {
  for (int64_t b = b0; b < b1; ++b)
    backward_utterance(p, b, grad_context, grad_alpha, alpha, grad_a, g, dz_buf, de_buf);
}

template <typename T>
SL_ISA_ENTRY void tanh_entry(T* x, int64_t n) {
  using O = VecOps<T>;
  int64_t k = 0;
  for (; k + O::kLanes <= n; k += O::kLanes) O::store(x + k, vec_tanh(O::load(x + k)));
  for (; k < n; ++k) x[k] = sl_tanh(x[k]);
}

template <typename T>
SL_ISA_ENTRY T dot_entry(const T* x, const T* y, int64_t n) {
  return dot(x, y, n);
}

template <typename T>
SL_ISA_ENTRY void axpy_entry(T* y, T w, const T* x, int64_t n) {
  axpy(y, w, x, n);
}

template <typename T>
SL_ISA_ENTRY void dz_rows_entry(T* h, const T* de, const T* u, int64_t rows, int64_t D, T* du, T* db) {
  using O = VecOps<T>;
  constexpr int W = O::kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    T* hr = h + r * D;
    const T de_r = de[r];
    if (de_r == T(0)) {  // padding, or no gradient: dz = 0
      std::fill(hr, hr + D, T(0));
      continue;
    }
    const Vec<T> de_v = O::set1(de_r);
    int64_t d = 0;
    for (; d + W <= D; d += W) {
      const Vec<T> hv = O::load(hr + d);
      const Vec<T> dz = preactivation_grad<Vec<T>>(de_v, O::load(u + d), hv);
      O::store(du + d, O::fmadd(de_v, hv, O::load(du + d)));
      O::store(db + d, O::load(db + d) + dz);
      O::store(hr + d, dz);
    }
    for (; d < D; ++d) {
      const T dz = preactivation_grad<T>(de_r, u[d], hr[d]);
      du[d] += de_r * hr[d];
      db[d] += dz;
      hr[d] = dz;
    }
  }
}

template <typename T>
constexpr IsaKernels<T> make_kernels() {
  return {kBlock<T>,         &narrow_forward_entry<T>, &narrow_backward_entry<T>, &tanh_entry<T>,
          &dot_entry<T>,     &axpy_entry<T>,           &dz_rows_entry<T>};
}

}  // namespace ser_lightning::cpu::SL_ISA_NAME
