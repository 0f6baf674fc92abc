// Fused attention pooling: operator schemas, input checks and the CPU kernels.
//
// CPU design, narrow problems (max(C, D) <= 64, the models' attention layers): one pass per utterance
// with no ATen call inside (see "Narrow path" below): projection, fast_tanh, softmax and context in
// registers and L1; the backward recomputes the activation per position, and da, dW (per-thread
// sums), du and dbias follow from dz without temporaries beyond an (L, N) buffer.
//
// CPU design, wide problems: rows of a (B*L positions) are processed in waves of up to 2^20 / D rows. Per wave,
// one GEMM and ATen's vectorised tanh write h = tanh(a_wave W^T + bias) into a reused buffer and
// one GEMV gives the scores u . h_i (ATen parallelises these; no ATen call runs inside a parallel
// region, which would nest thread pools); at::parallel_for over the wave's utterances then runs the
// online softmax (state carried across waves) and the context accumulation in plain loops. The
// backward first forms de for all positions (s_i = dc . a_i + dalpha_i by one batched GEMV; S needs
// the whole utterance), then per wave recomputes h instead of saving the (B, L, D) activation, turns
// it into dz in place (per-thread du and dbias accumulators) and applies dW += dz^T a_wave and
// da = dz W as GEMMs before adding alpha_i dc. Padding rows are projected too (their dz is exactly 0),
// which keeps waves contiguous. tanh there is ATen's; the rest of the math is attention_pool.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "attention_pool.h"

extern "C" {
// `import ser_lightning._C` loads this library, whose static initialisers register the operators.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace ser_lightning {

using at::Tensor;

void check_forward_inputs(const Tensor& a, const Tensor& weight, const Tensor& bias, const Tensor& u, double lam,
                          const Tensor& lengths) {
  TORCH_CHECK(a.dim() == 3, "attention_pool: `a` must be (B, L, C), got ", a.sizes());
  const int64_t batch = a.size(0), positions = a.size(1), channels = a.size(2);
  TORCH_CHECK(batch >= 1 && positions >= 1 && channels >= 1, "attention_pool: `a` must have B, L, C >= 1, got ",
              a.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == channels && weight.size(0) >= 1,
              "attention_pool: `weight` must be (D, C=", channels, "), got ", weight.sizes());
  const int64_t dim = weight.size(0);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == dim, "attention_pool: `bias` must be (D=", dim, ",), got ",
              bias.sizes());
  TORCH_CHECK(u.dim() == 1 && u.size(0) == dim, "attention_pool: `u` must be (D=", dim, ",), got ", u.sizes());
  const std::pair<const char*, const Tensor*> params[] = {{"weight", &weight}, {"bias", &bias}, {"u", &u}};
  for (const auto& [name, t] : params) {
    TORCH_CHECK(t->device() == a.device(), "attention_pool: `", name, "` is on ", t->device(), " but `a` is on ",
                a.device());
    TORCH_CHECK(t->scalar_type() == a.scalar_type(), "attention_pool: `", name, "` has dtype ", t->scalar_type(),
                " but `a` has ", a.scalar_type());
  }
  TORCH_CHECK(lam > 0 && std::isfinite(lam), "attention_pool: `lam` must be finite and > 0, got ", lam);
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == batch && lengths.scalar_type() == at::kLong,
              "attention_pool: `lengths` must be int64 of shape (", batch, ",), got ", lengths.scalar_type(),
              " of shape ", lengths.sizes());
  TORCH_CHECK(lengths.device() == a.device(), "attention_pool: `lengths` is on ", lengths.device(),
              " but `a` is on ", a.device());
}

void check_backward_inputs(const Tensor& grad_context, const Tensor& grad_alpha, const Tensor& a,
                           const Tensor& weight, const Tensor& bias, const Tensor& u, const Tensor& alpha, double lam,
                           const Tensor& lengths) {
  check_forward_inputs(a, weight, bias, u, lam, lengths);
  const std::pair<const char*, const Tensor*> per_position[] = {{"grad_alpha", &grad_alpha}, {"alpha", &alpha}};
  for (const auto& [name, t] : per_position) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == a.size(0) && t->size(1) == a.size(1), "attention_pool_backward: `",
                name, "` must be (B, L)=(", a.size(0), ", ", a.size(1), "), got ", t->sizes());
  }
  TORCH_CHECK(grad_context.dim() == 2 && grad_context.size(0) == a.size(0) && grad_context.size(1) == a.size(2),
              "attention_pool_backward: `grad_context` must be (B, C)=(", a.size(0), ", ", a.size(2), "), got ",
              grad_context.sizes());
  const std::pair<const char*, const Tensor*> grads[] = {
      {"grad_context", &grad_context}, {"grad_alpha", &grad_alpha}, {"alpha", &alpha}};
  for (const auto& [name, t] : grads) {
    TORCH_CHECK(t->device() == a.device(), "attention_pool_backward: `", name, "` is on ", t->device(),
                " but `a` is on ", a.device());
    TORCH_CHECK(t->scalar_type() == a.scalar_type(), "attention_pool_backward: `", name, "` has dtype ",
                t->scalar_type(), " but `a` has ", a.scalar_type());
  }
}

namespace {

// Projected rows per wave (x D values): the activation buffer stays a few MiB at most.
constexpr int64_t kWaveElements = int64_t(1) << 20;
// Minimum loop work (multiply-adds) per parallel chunk, so small batches do not wake threads.
constexpr int64_t kMinChunkWork = int64_t(1) << 15;

int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, kMinChunkWork / std::max<int64_t>(1, work_per_item)); }

void check_cpu_inputs(const Tensor& a, const Tensor& lengths) {
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "attention_pool: the CPU kernel supports float32 and float64 `a`, got ", a.scalar_type());
  const Tensor lens = lengths.contiguous();
  const int64_t* len = lens.data_ptr<int64_t>();
  const auto [lo, hi] = std::minmax_element(len, len + lens.numel());
  TORCH_CHECK(*lo >= 1 && *hi <= a.size(1), "attention_pool: `lengths` must lie in 1..L=", a.size(1),
              ", got values in ", *lo, "..", *hi);
}

// Calls wave(row0, rows, h) for consecutive waves of rows of a2d (B*L rows, padding included), with
// h = tanh(a2d[row0:row0 + rows] W^T + bias) in a reused buffer. The GEMM and tanh are ATen calls made
// outside any parallel region, so they use the intra-op threads themselves.
template <typename F>
void for_each_wave(const Tensor& a2d, const Tensor& weight, const Tensor& bias, F&& wave) {
  const int64_t total = a2d.size(0), D = weight.size(0);
  const int64_t wave_rows = std::min(total, std::max<int64_t>(1, kWaveElements / D));
  Tensor buffer = at::empty({wave_rows, D}, a2d.options());
  const Tensor weight_t = weight.t();
  for (int64_t row0 = 0; row0 < total; row0 += wave_rows) {
    const int64_t rows = std::min(wave_rows, total - row0);
    Tensor h = buffer.narrow(0, 0, rows);
    at::addmm_out(h, bias, a2d.narrow(0, row0, rows), weight_t);
    h.tanh_();
    wave(row0, rows, h);
  }
}

template <typename scalar_t>
void forward_cpu_kernel(const Tensor& a, const Tensor& weight, const Tensor& bias, const Tensor& u, double lam_d,
                        const Tensor& lengths, Tensor& context, Tensor& alpha) {
  using acc_t = scalar_t;
  const int64_t B = a.size(0), L = a.size(1), C = a.size(2), D = weight.size(0);
  const scalar_t* a_ptr = a.data_ptr<scalar_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  scalar_t* alpha_ptr = alpha.data_ptr<scalar_t>();
  scalar_t* context_ptr = context.data_ptr<scalar_t>();
  const acc_t lam = static_cast<acc_t>(lam_d);
  // Per utterance: online-softmax state and exp-weighted context sum, carried across waves.
  std::vector<SoftmaxState<acc_t>> state(static_cast<size_t>(B), SoftmaxState<acc_t>::empty());
  std::vector<acc_t> ctx(static_cast<size_t>(B * C), acc_t(0));

  Tensor alpha_flat = alpha.view({B * L});
  for_each_wave(a.view({B * L, C}), weight, bias, [&](int64_t row0, int64_t rows, const Tensor& h) {
    Tensor scores_wave = alpha_flat.narrow(0, row0, rows);
    at::mv_out(scores_wave, h, u);  // e_i = u . h_i, written where alpha goes
    const int64_t b_first = row0 / L, b_end = (row0 + rows - 1) / L + 1;
    at::parallel_for(b_first, b_end, grain(std::min(rows, L) * (C + D)), [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> weights;
      for (int64_t b = b0; b < b1; ++b) {
        // This wave's valid positions [i0, i1) of utterance b.
        const int64_t i0 = std::max<int64_t>(row0 - b * L, 0), i1 = std::min(len[b], row0 + rows - b * L);
        if (i1 <= i0) continue;
        scalar_t* scores = alpha_ptr + b * L;
        acc_t seg_max = neg_infinity<acc_t>();
        for (int64_t i = i0; i < i1; ++i) {
          scores[i] *= lam;  // scaled score; normalised once the utterance is complete
          seg_max = std::max<acc_t>(seg_max, scores[i]);
        }
        weights.resize(static_cast<size_t>(i1 - i0));
        acc_t seg_sum = 0;
        for (int64_t i = i0; i < i1; ++i) seg_sum += (weights[i - i0] = sl_exp(scores[i] - seg_max));
        acc_t scale_old, scale_new;
        state[b].merge(seg_max, seg_sum, &scale_old, &scale_new);
        acc_t* c_acc = ctx.data() + b * C;
        for (int64_t c = 0; c < C; ++c) c_acc[c] *= scale_old;
        for (int64_t i = i0; i < i1; ++i) {
          const acc_t w = scale_new * weights[i - i0];
          const scalar_t* a_i = a_ptr + (b * L + i) * C;
          for (int64_t c = 0; c < C; ++c) c_acc[c] += w * a_i[c];
        }
      }
    });
  });
  at::parallel_for(0, B, grain(L + C), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      scalar_t* al = alpha_ptr + b * L;
      for (int64_t i = 0; i < len[b]; ++i) al[i] = state[b].weight(al[i]);
      std::fill(al + len[b], al + L, scalar_t(0));
      const acc_t inv = acc_t(1) / state[b].sum;
      for (int64_t c = 0; c < C; ++c) context_ptr[b * C + c] = ctx[b * C + c] * inv;
    }
  });
}

template <typename scalar_t>
void backward_cpu_kernel(const Tensor& grad_context, const Tensor& grad_alpha, const Tensor& a, const Tensor& weight,
                         const Tensor& bias, const Tensor& u, const Tensor& alpha, double lam_d, const Tensor& lengths,
                         Tensor& grad_a, Tensor& grad_weight, Tensor& grad_bias, Tensor& grad_u) {
  using acc_t = scalar_t;
  const int64_t B = a.size(0), L = a.size(1), C = a.size(2), D = weight.size(0);
  const scalar_t* u_ptr = u.data_ptr<scalar_t>();
  const scalar_t* alpha_ptr = alpha.data_ptr<scalar_t>();
  const scalar_t* dc_ptr = grad_context.data_ptr<scalar_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  scalar_t* ga_ptr = grad_a.data_ptr<scalar_t>();
  const acc_t lam = static_cast<acc_t>(lam_d);

  // de_i for every position (0 at padding): s_i = dc . a_i + dalpha_i, S = sum_i alpha_i s_i.
  Tensor s_all = at::baddbmm(grad_alpha.unsqueeze(2), a, grad_context.unsqueeze(2));  // (B, L, 1)
  const scalar_t* s_ptr = s_all.data_ptr<scalar_t>();
  std::vector<acc_t> de(static_cast<size_t>(B * L));
  at::parallel_for(0, B, grain(L), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* de_b = de.data() + b * L;
      acc_t s_mean = 0;
      for (int64_t i = 0; i < len[b]; ++i) {
        de_b[i] = s_ptr[b * L + i];
        s_mean += alpha_ptr[b * L + i] * de_b[i];
      }
      for (int64_t i = 0; i < len[b]; ++i) de_b[i] = score_grad<acc_t>(lam, alpha_ptr[b * L + i], de_b[i], s_mean);
      std::fill(de_b + len[b], de_b + L, acc_t(0));
    }
  });

  // du and dbias: one accumulator row per thread, summed at the end.
  const int64_t threads = at::get_num_threads();
  std::vector<acc_t> du(static_cast<size_t>(threads * D), acc_t(0)), db(du);
  const Tensor a2d = a.view({B * L, C}), ga2d = grad_a.view({B * L, C});
  grad_weight.zero_();
  for_each_wave(a2d, weight, bias, [&](int64_t row0, int64_t rows, Tensor& h) {
    scalar_t* h_ptr = h.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(D), [&](int64_t r0, int64_t r1) {
      acc_t* __restrict__ du_t = du.data() + at::get_thread_num() * D;
      acc_t* __restrict__ db_t = db.data() + at::get_thread_num() * D;
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* __restrict__ hr = h_ptr + r * D;  // becomes dz_r in place
        const acc_t de_r = de[row0 + r];
        if (de_r == acc_t(0)) {  // padding (or no gradient): dz = 0
          std::fill(hr, hr + D, scalar_t(0));
          continue;
        }
        for (int64_t d = 0; d < D; ++d) {
          const acc_t dz = preactivation_grad<acc_t>(de_r, u_ptr[d], hr[d]);
          du_t[d] += de_r * hr[d];
          db_t[d] += dz;
          hr[d] = dz;
        }
      }
    });
    grad_weight.addmm_(h.t(), a2d.narrow(0, row0, rows));
    Tensor ga_rows = ga2d.narrow(0, row0, rows);
    at::mm_out(ga_rows, h, weight);
    at::parallel_for(row0, row0 + rows, grain(C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / L;
        if (r - b * L >= len[b]) continue;  // padding: dz = 0 and no alpha term
        const acc_t w = alpha_ptr[r];
        const scalar_t* dc = dc_ptr + b * C;
        scalar_t* ga_r = ga_ptr + r * C;
        for (int64_t c = 0; c < C; ++c) ga_r[c] += w * dc[c];
      }
    });
  });
  scalar_t* gu = grad_u.data_ptr<scalar_t>();
  scalar_t* gb = grad_bias.data_ptr<scalar_t>();
  for (int64_t d = 0; d < D; ++d) {
    acc_t su = 0, sb = 0;
    for (int64_t t = 0; t < threads; ++t) {
      su += du[t * D + d];
      sb += db[t * D + d];
    }
    gu[d] = su;
    gb[d] = sb;
  }
}

// ---------------------------------------------------------------------------------------------
// Narrow path (max(C, D) <= kNarrowMax): one pass per utterance, no ATen call and no temporaries
// beyond an (L, N) buffer per thread. C and D are padded to N (16, 32 or 64, a compile-time
// constant) so the per-position vectors of length N (pre-activation, dz, a row of da) stay in
// registers; the padding entries of the weights, bias and u are 0, so they add nothing. Loops take
// 4, 2 then 1 positions (or dW columns) at a time: independent multiply-add chains, shared loads.

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
// AVX-512, AVX2+FMA and baseline x86-64 copies of each entry point, chosen once by the loader.
// flatten inlines every call, so no vector argument crosses a function boundary between code
// built for different instruction sets (their calling conventions differ).
#define SL_MULTIVERSION __attribute__((flatten, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__GNUC__) || defined(__clang__)
#define SL_MULTIVERSION __attribute__((flatten))
#else
#define SL_MULTIVERSION
#endif
#if defined(__GNUC__) || defined(__clang__)
#define SL_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SL_ALWAYS_INLINE inline
#endif

constexpr int64_t kNarrowMax = 64;
// Minimum multiply-adds per parallel chunk of utterances on the narrow path.
constexpr int64_t kNarrowChunkWork = int64_t(1) << 18;

template <typename T>
struct NarrowProblem {
  int64_t L, C, D, N;
  const T* a;          // (B, L, C)
  const int64_t* len;  // (B,)
  const T* wt;         // (C, N): wt[c N + d] = W[d, c], 0 for d >= D
  const T* wp;         // (D, N): wp[d N + c] = W[d, c], 0 for c >= C
  const T* bias;       // (N,), 0 for d >= D
  const T* u;          // (N,), 0 for d >= D
  T lam;
};

// A 64-byte vector of T (GCC/Clang vector extension): one AVX-512 register, two AVX or four SSE ones.
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int kLanes = 64 / sizeof(T);

template <typename T>
SL_ALWAYS_INLINE Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
SL_ALWAYS_INLINE void store(T* p, Vec<T> v) { std::memcpy(p, &v, sizeof v); }

SL_ALWAYS_INLINE Vec<float> vec_tanh(Vec<float> x) { return fast_tanh_rational(x); }
SL_ALWAYS_INLINE Vec<double> vec_tanh(Vec<double> x) {
  for (int k = 0; k < kLanes<double>; ++k) x[k] = fast_tanh(x[k]);
  return x;
}

// Sum of all lanes of the V vectors x[0..V).
template <typename T, int V>
SL_ALWAYS_INLINE T sum_all(const Vec<T>* x) {
  Vec<T> s = x[0];
  for (int v = 1; v < V; ++v) s += x[v];
  T total = 0;
  for (int k = 0; k < kLanes<T>; ++k) total += s[k];
  return total;
}

template <typename T>
SL_ALWAYS_INLINE T dot(const T* __restrict__ x, const T* __restrict__ y, int64_t n) {
  Vec<T> part{};
  int64_t k = 0;
  for (; k + kLanes<T> <= n; k += kLanes<T>) part += load(x + k) * load(y + k);
  T total = sum_all<T, 1>(&part);
  for (; k < n; ++k) total += x[k] * y[k];
  return total;
}

// h[k] = tanh(W a_{i+k} + bias) for the P rows a + k C, each as N / kLanes vectors. Several rows at
// once share the loads of W and give independent multiply-add chains.
template <typename T, int N, int P>
SL_ALWAYS_INLINE void project_tanh(const NarrowProblem<T>& p, const T* __restrict__ a, Vec<T> (&h)[P][N / kLanes<T>]) {
  constexpr int V = N / kLanes<T>, W = kLanes<T>;
  Vec<T> z[P][V];
  for (int v = 0; v < V; ++v) z[0][v] = load(p.bias + v * W);
  for (int k = 1; k < P; ++k)
    for (int v = 0; v < V; ++v) z[k][v] = z[0][v];
  for (int64_t c = 0; c < p.C; ++c) {
    Vec<T> w[V];
    for (int v = 0; v < V; ++v) w[v] = load(p.wt + c * N + v * W);
    for (int k = 0; k < P; ++k) {
      const T ac = a[k * p.C + c];
      for (int v = 0; v < V; ++v) z[k][v] += ac * w[v];
    }
  }
  for (int k = 0; k < P; ++k)
    for (int v = 0; v < V; ++v) h[k][v] = vec_tanh(z[k][v]);
}

// Scaled scores lam e_i of the P positions from i.
template <typename T, int N, int P>
SL_ALWAYS_INLINE void scores(const NarrowProblem<T>& p, const T* __restrict__ a_b, int64_t i, T* __restrict__ out) {
  constexpr int V = N / kLanes<T>;
  Vec<T> h[P][V];
  project_tanh<T, N, P>(p, a_b + i * p.C, h);
  for (int k = 0; k < P; ++k) {
    for (int v = 0; v < V; ++v) h[k][v] *= load(p.u + v * kLanes<T>);
    out[i + k] = p.lam * sum_all<T, V>(h[k]);
  }
}

template <typename T, int N>
SL_ALWAYS_INLINE void narrow_forward_utterance(const NarrowProblem<T>& p, int64_t b, T* __restrict__ context,
                                               T* __restrict__ alpha) {
  const int64_t L = p.L, C = p.C, n = p.len[b];
  const T* __restrict__ a_b = p.a + b * L * C;
  T* __restrict__ al = alpha + b * L;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) scores<T, N, 4>(p, a_b, i, al);
  for (; i + 2 <= n; i += 2) scores<T, N, 2>(p, a_b, i, al);
  if (i < n) scores<T, N, 1>(p, a_b, i, al);
  const T max = *std::max_element(al, al + n);
  T sum = 0;
  for (i = 0; i < n; ++i) sum += (al[i] = sl_exp(al[i] - max));
  const T inv = T(1) / sum;
  T* __restrict__ ctx = context + b * C;
  std::fill(ctx, ctx + C, T(0));
  for (i = 0; i < n; ++i) {
    const T w = (al[i] *= inv);
    for (int64_t c = 0; c < C; ++c) ctx[c] += w * a_b[i * C + c];
  }
  std::fill(al + n, al + L, T(0));
}

// Per-thread sums of the parameter gradients: dW^T (C, N), dbias (N), du (N).
template <typename T>
struct NarrowGrads {
  T* wt;
  T* bias;
  T* u;
};

// For the P positions from i: dz (into dz_buf), the du and dbias terms, and da.
template <typename T, int N, int P>
SL_ALWAYS_INLINE void backward_positions(const NarrowProblem<T>& p, const T* __restrict__ a_b, int64_t i,
                                         const T* __restrict__ al, const T* __restrict__ de_buf,
                                         const Vec<T>* dc_p, const Vec<T>* u, Vec<T>* du, Vec<T>* db,
                                         T* __restrict__ dz_buf, T* __restrict__ ga) {
  constexpr int V = N / kLanes<T>, W = kLanes<T>;
  const int64_t C = p.C, D = p.D;
  Vec<T> h[P][V];
  project_tanh<T, N, P>(p, a_b + i * C, h);
  Vec<T> da[P][V];  // da_i = alpha_i dc + W^T dz_i
  for (int k = 0; k < P; ++k) {
    const Vec<T> de = Vec<T>{} + de_buf[i + k];
    T* __restrict__ dz = dz_buf + (i + k) * N;
    for (int v = 0; v < V; ++v) {
      const Vec<T> dz_v = preactivation_grad<Vec<T>>(de, u[v], h[k][v]);
      du[v] += de * h[k][v];
      db[v] += dz_v;
      store(dz + v * W, dz_v);
      da[k][v] = al[i + k] * dc_p[v];
    }
  }
  for (int64_t d = 0; d < D; ++d) {
    Vec<T> w[V];
    for (int v = 0; v < V; ++v) w[v] = load(p.wp + d * N + v * W);
    for (int k = 0; k < P; ++k) {
      const T dzd = dz_buf[(i + k) * N + d];
      for (int v = 0; v < V; ++v) da[k][v] += dzd * w[v];
    }
  }
  for (int k = 0; k < P; ++k) {
    T row[N];
    for (int v = 0; v < V; ++v) store(row + v * W, da[k][v]);
    std::copy(row, row + C, ga + (i + k) * C);
  }
}

// dW^T[c + k] += sum_i a_{i, c+k} dz_i for the P columns from c.
template <typename T, int N, int P>
SL_ALWAYS_INLINE void weight_grad_columns(const NarrowProblem<T>& p, const T* __restrict__ a_b, int64_t n, int64_t c,
                                          const T* __restrict__ dz_buf, T* __restrict__ gw) {
  constexpr int V = N / kLanes<T>, W = kLanes<T>;
  Vec<T> acc[P][V];
  for (int k = 0; k < P; ++k)
    for (int v = 0; v < V; ++v) acc[k][v] = load(gw + (c + k) * N + v * W);
  for (int64_t i = 0; i < n; ++i) {
    Vec<T> dz[V];
    for (int v = 0; v < V; ++v) dz[v] = load(dz_buf + i * N + v * W);
    for (int k = 0; k < P; ++k) {
      const T ac = a_b[i * p.C + c + k];
      for (int v = 0; v < V; ++v) acc[k][v] += ac * dz[v];
    }
  }
  for (int k = 0; k < P; ++k)
    for (int v = 0; v < V; ++v) store(gw + (c + k) * N + v * W, acc[k][v]);
}

template <typename T, int N>
SL_ALWAYS_INLINE void narrow_backward_utterance(const NarrowProblem<T>& p, int64_t b, const T* __restrict__ dc_all,
                                                const T* __restrict__ dalpha_all, const T* __restrict__ alpha_all,
                                                T* __restrict__ grad_a, const NarrowGrads<T>& g,
                                                T* __restrict__ dz_buf, T* __restrict__ de_buf) {
  constexpr int V = N / kLanes<T>, W = kLanes<T>;
  const int64_t L = p.L, C = p.C, n = p.len[b];
  const T* __restrict__ a_b = p.a + b * L * C;
  const T* __restrict__ al = alpha_all + b * L;
  const T* __restrict__ dc = dc_all + b * C;
  T* __restrict__ ga = grad_a + b * L * C;
  T s_mean = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T s = dot(dc, a_b + i * C, C) + dalpha_all[b * L + i];
    de_buf[i] = s;
    s_mean += al[i] * s;
  }
  for (int64_t i = 0; i < n; ++i) de_buf[i] = score_grad<T>(p.lam, al[i], de_buf[i], s_mean);
  T dc_pad[N] = {};
  std::copy(dc, dc + C, dc_pad);
  Vec<T> dc_p[V], u[V], du[V] = {}, db[V] = {};
  for (int v = 0; v < V; ++v) {
    dc_p[v] = load(dc_pad + v * W);
    u[v] = load(p.u + v * W);
  }
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) backward_positions<T, N, 4>(p, a_b, i, al, de_buf, dc_p, u, du, db, dz_buf, ga);
  for (; i + 2 <= n; i += 2) backward_positions<T, N, 2>(p, a_b, i, al, de_buf, dc_p, u, du, db, dz_buf, ga);
  if (i < n) backward_positions<T, N, 1>(p, a_b, i, al, de_buf, dc_p, u, du, db, dz_buf, ga);
  std::fill(ga + n * C, ga + L * C, T(0));
  for (int v = 0; v < V; ++v) {
    store(g.u + v * W, load(g.u + v * W) + du[v]);
    store(g.bias + v * W, load(g.bias + v * W) + db[v]);
  }
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) weight_grad_columns<T, N, 4>(p, a_b, n, c, dz_buf, g.wt);
  for (; c + 2 <= C; c += 2) weight_grad_columns<T, N, 2>(p, a_b, n, c, dz_buf, g.wt);
  if (c < C) weight_grad_columns<T, N, 1>(p, a_b, n, c, dz_buf, g.wt);
}

template <typename T>
SL_ALWAYS_INLINE void narrow_forward_range(const NarrowProblem<T>& p, int64_t b0, int64_t b1, T* context, T* alpha) {
  for (int64_t b = b0; b < b1; ++b) {
    switch (p.N) {
      case 16: narrow_forward_utterance<T, 16>(p, b, context, alpha); break;
      case 32: narrow_forward_utterance<T, 32>(p, b, context, alpha); break;
      default: narrow_forward_utterance<T, 64>(p, b, context, alpha); break;
    }
  }
}

template <typename T>
SL_ALWAYS_INLINE void narrow_backward_range(const NarrowProblem<T>& p, int64_t b0, int64_t b1, const T* dc,
                                            const T* dalpha, const T* alpha, T* grad_a, const NarrowGrads<T>& g,
                                            T* dz_buf, T* de_buf) {
  for (int64_t b = b0; b < b1; ++b) {
    switch (p.N) {
      case 16: narrow_backward_utterance<T, 16>(p, b, dc, dalpha, alpha, grad_a, g, dz_buf, de_buf); break;
      case 32: narrow_backward_utterance<T, 32>(p, b, dc, dalpha, alpha, grad_a, g, dz_buf, de_buf); break;
      default: narrow_backward_utterance<T, 64>(p, b, dc, dalpha, alpha, grad_a, g, dz_buf, de_buf); break;
    }
  }
}

// The multiversioned entry points (target_clones does not apply to templates).
SL_MULTIVERSION void narrow_forward(const NarrowProblem<float>& p, int64_t b0, int64_t b1, float* context,
                                    float* alpha) {
  narrow_forward_range(p, b0, b1, context, alpha);
}
SL_MULTIVERSION void narrow_forward(const NarrowProblem<double>& p, int64_t b0, int64_t b1, double* context,
                                    double* alpha) {
  narrow_forward_range(p, b0, b1, context, alpha);
}
SL_MULTIVERSION void narrow_backward(const NarrowProblem<float>& p, int64_t b0, int64_t b1, const float* dc,
                                     const float* dalpha, const float* alpha, float* grad_a,
                                     const NarrowGrads<float>& g, float* dz_buf, float* de_buf) {
  narrow_backward_range(p, b0, b1, dc, dalpha, alpha, grad_a, g, dz_buf, de_buf);
}
SL_MULTIVERSION void narrow_backward(const NarrowProblem<double>& p, int64_t b0, int64_t b1, const double* dc,
                                     const double* dalpha, const double* alpha, double* grad_a,
                                     const NarrowGrads<double>& g, double* dz_buf, double* de_buf) {
  narrow_backward_range(p, b0, b1, dc, dalpha, alpha, grad_a, g, dz_buf, de_buf);
}

bool is_narrow(const Tensor& a, const Tensor& weight) {
  return std::max(a.size(2), weight.size(0)) <= kNarrowMax;
}

// The padded copies of the parameters a NarrowProblem points into.
template <typename T>
struct NarrowParams {
  std::vector<T> wt, wp, bias, u;
  NarrowProblem<T> problem;

  NarrowParams(const Tensor& a, const Tensor& weight, const Tensor& bias_in, const Tensor& u_in, double lam,
               const Tensor& lengths, bool backward) {
    const int64_t L = a.size(1), C = a.size(2), D = weight.size(0);
    int64_t N = 16;
    while (N < std::max(C, D)) N *= 2;
    const T* w = weight.data_ptr<T>();
    wt.assign(static_cast<size_t>(C * N), T(0));
    for (int64_t d = 0; d < D; ++d)
      for (int64_t c = 0; c < C; ++c) wt[c * N + d] = w[d * C + c];
    if (backward) {
      wp.assign(static_cast<size_t>(D * N), T(0));
      for (int64_t d = 0; d < D; ++d) std::copy(w + d * C, w + (d + 1) * C, wp.data() + d * N);
    }
    bias.assign(static_cast<size_t>(N), T(0));
    u.assign(static_cast<size_t>(N), T(0));
    std::copy(bias_in.data_ptr<T>(), bias_in.data_ptr<T>() + D, bias.data());
    std::copy(u_in.data_ptr<T>(), u_in.data_ptr<T>() + D, u.data());
    problem = {L, C, D, N, a.data_ptr<T>(), lengths.data_ptr<int64_t>(), wt.data(), wp.data(), bias.data(),
               u.data(), static_cast<T>(lam)};
  }
};

template <typename scalar_t>
void narrow_forward_cpu(const Tensor& a, const Tensor& weight, const Tensor& bias, const Tensor& u, double lam,
                        const Tensor& lengths, Tensor& context, Tensor& alpha) {
  const NarrowParams<scalar_t> params(a, weight, bias, u, lam, lengths, /*backward=*/false);
  const NarrowProblem<scalar_t>& p = params.problem;
  scalar_t* context_ptr = context.data_ptr<scalar_t>();
  scalar_t* alpha_ptr = alpha.data_ptr<scalar_t>();
  const int64_t work = std::max<int64_t>(1, p.L * p.C * p.N);
  at::parallel_for(0, a.size(0), std::max<int64_t>(1, kNarrowChunkWork / work), [&](int64_t b0, int64_t b1) {
    narrow_forward(p, b0, b1, context_ptr, alpha_ptr);
  });
}

template <typename scalar_t>
void narrow_backward_cpu(const Tensor& grad_context, const Tensor& grad_alpha, const Tensor& a, const Tensor& weight,
                         const Tensor& bias, const Tensor& u, const Tensor& alpha, double lam, const Tensor& lengths,
                         Tensor& grad_a, Tensor& grad_weight, Tensor& grad_bias, Tensor& grad_u) {
  const NarrowParams<scalar_t> params(a, weight, bias, u, lam, lengths, /*backward=*/true);
  const NarrowProblem<scalar_t>& p = params.problem;
  const int64_t C = p.C, D = p.D, N = p.N, per_thread = (C + 2) * N;
  const int64_t threads = at::get_num_threads();
  std::vector<scalar_t> sums(static_cast<size_t>(threads * per_thread), scalar_t(0));
  const scalar_t* dc = grad_context.data_ptr<scalar_t>();
  const scalar_t* dalpha = grad_alpha.data_ptr<scalar_t>();
  const scalar_t* alpha_ptr = alpha.data_ptr<scalar_t>();
  scalar_t* ga = grad_a.data_ptr<scalar_t>();
  const int64_t work = std::max<int64_t>(1, 3 * p.L * C * N);
  at::parallel_for(0, a.size(0), std::max<int64_t>(1, kNarrowChunkWork / work), [&](int64_t b0, int64_t b1) {
    scalar_t* mine = sums.data() + at::get_thread_num() * per_thread;
    const NarrowGrads<scalar_t> g{mine, mine + C * N, mine + (C + 1) * N};
    std::vector<scalar_t> buffer(static_cast<size_t>(p.L * (N + 1)));
    narrow_backward(p, b0, b1, dc, dalpha, alpha_ptr, ga, g, buffer.data(), buffer.data() + p.L * N);
  });
  scalar_t* gw = grad_weight.data_ptr<scalar_t>();
  scalar_t* gb = grad_bias.data_ptr<scalar_t>();
  scalar_t* gu = grad_u.data_ptr<scalar_t>();
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t c = 0; c < C; ++c) {
      scalar_t total = 0;
      for (int64_t t = 0; t < threads; ++t) total += sums[t * per_thread + c * N + d];
      gw[d * C + c] = total;
    }
    scalar_t total_b = 0, total_u = 0;
    for (int64_t t = 0; t < threads; ++t) {
      total_b += sums[t * per_thread + C * N + d];
      total_u += sums[t * per_thread + (C + 1) * N + d];
    }
    gb[d] = total_b;
    gu[d] = total_u;
  }
}

std::tuple<Tensor, Tensor> attention_pool_cpu(const Tensor& a_in, const Tensor& weight_in, const Tensor& bias_in,
                                              const Tensor& u_in, double lam, const Tensor& lengths_in) {
  check_forward_inputs(a_in, weight_in, bias_in, u_in, lam, lengths_in);
  check_cpu_inputs(a_in, lengths_in);
  const Tensor a = a_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous(),
               u = u_in.contiguous(), lengths = lengths_in.contiguous();
  Tensor context = at::empty({a.size(0), a.size(2)}, a.options());
  Tensor alpha = at::empty({a.size(0), a.size(1)}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "attention_pool_cpu", [&] {
    if (is_narrow(a, weight)) {
      narrow_forward_cpu<scalar_t>(a, weight, bias, u, lam, lengths, context, alpha);
    } else {
      forward_cpu_kernel<scalar_t>(a, weight, bias, u, lam, lengths, context, alpha);
    }
  });
  return {context, alpha};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_pool_backward_cpu(
    const Tensor& grad_context_in, const Tensor& grad_alpha_in, const Tensor& a_in, const Tensor& weight_in,
    const Tensor& bias_in, const Tensor& u_in, const Tensor& alpha_in, double lam, const Tensor& lengths_in) {
  check_backward_inputs(grad_context_in, grad_alpha_in, a_in, weight_in, bias_in, u_in, alpha_in, lam, lengths_in);
  check_cpu_inputs(a_in, lengths_in);
  const Tensor grad_context = grad_context_in.contiguous(), grad_alpha = grad_alpha_in.contiguous(),
               a = a_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous(),
               u = u_in.contiguous(), alpha = alpha_in.contiguous(), lengths = lengths_in.contiguous();
  Tensor grad_a = at::empty_like(a);
  Tensor grad_weight = at::empty_like(weight), grad_bias = at::empty_like(bias), grad_u = at::empty_like(u);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "attention_pool_backward_cpu", [&] {
    if (is_narrow(a, weight)) {
      narrow_backward_cpu<scalar_t>(grad_context, grad_alpha, a, weight, bias, u, alpha, lam, lengths, grad_a,
                                    grad_weight, grad_bias, grad_u);
    } else {
      backward_cpu_kernel<scalar_t>(grad_context, grad_alpha, a, weight, bias, u, alpha, lam, lengths, grad_a,
                                    grad_weight, grad_bias, grad_u);
    }
  });
  return {grad_a, grad_weight, grad_bias, grad_u};
}

// Autograd in C++ rather than torch.library.register_autograd: the Python autograd path costs
// more than the kernels themselves at the model's small shapes. Saves the inputs and alpha only;
// the backward operator recomputes the activation.
class AttentionPoolFunction : public torch::autograd::Function<AttentionPoolFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& a,
                                                const Tensor& weight, const Tensor& bias, const Tensor& u,
                                                double lam, const Tensor& lengths) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("ser_lightning::attention_pool", "")
                               .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                 const Tensor&, double, const Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [context, alpha] = op.call(a, weight, bias, u, lam, lengths);
    ctx->save_for_backward({a, weight, bias, u, alpha, lengths});
    ctx->saved_data["lam"] = lam;
    return {context, alpha};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("ser_lightning::attention_pool_backward", "")
            .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                              const Tensor&, const Tensor&, const Tensor&,
                                                              const Tensor&, double, const Tensor&)>();
    const auto saved = ctx->get_saved_variables();
    auto [grad_a, grad_weight, grad_bias, grad_u] = op.call(grads[0], grads[1], saved[0], saved[1], saved[2],
                                                            saved[3], saved[4], ctx->saved_data["lam"].toDouble(),
                                                            saved[5]);
    return {grad_a, grad_weight, grad_bias, grad_u, Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> attention_pool_autograd(const Tensor& a, const Tensor& weight, const Tensor& bias,
                                                   const Tensor& u, double lam, const Tensor& lengths) {
  auto outputs = AttentionPoolFunction::apply(a, weight, bias, u, lam, lengths);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY(ser_lightning, m) {
  m.def("attention_pool(Tensor a, Tensor weight, Tensor bias, Tensor u, float lam, Tensor lengths)"
        " -> (Tensor context, Tensor alpha)");
  m.def("attention_pool_backward(Tensor grad_context, Tensor grad_alpha, Tensor a, Tensor weight, Tensor bias,"
        " Tensor u, Tensor alpha, float lam, Tensor lengths)"
        " -> (Tensor grad_a, Tensor grad_weight, Tensor grad_bias, Tensor grad_u)");
}

TORCH_LIBRARY_IMPL(ser_lightning, CPU, m) {
  m.impl("attention_pool", &attention_pool_cpu);
  m.impl("attention_pool_backward", &attention_pool_backward_cpu);
}

TORCH_LIBRARY_IMPL(ser_lightning, Autograd, m) { m.impl("attention_pool", &attention_pool_autograd); }

}  // namespace ser_lightning
