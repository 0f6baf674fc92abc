// Fused attention pooling: operator schemas, input checks and the CPU kernels.
//
// CPU design: rows of a (B*L positions) are processed in waves of up to 2^20 / D rows. Per wave,
// one GEMM and ATen's vectorised tanh write h = tanh(a_wave W^T + bias) into a reused buffer and
// one GEMV gives the scores u . h_i (ATen parallelises these; no ATen call runs inside a parallel
// region, which would nest thread pools); at::parallel_for over the wave's utterances then runs the
// online softmax (state carried across waves) and the context accumulation in plain loops. The
// backward first forms de for all positions (s_i = dc . a_i + dalpha_i by one batched GEMV; S needs
// the whole utterance), then per wave recomputes h instead of saving the (B, L, D) activation, turns
// it into dz in place (per-thread du and dbias accumulators) and applies dW += dz^T a_wave and
// da = dz W as GEMMs before adding alpha_i dc. Padding rows are projected too (their dz is exactly 0),
// which keeps waves contiguous. tanh on the CPU is ATen's; the rest of the math is attention_pool.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
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

std::tuple<Tensor, Tensor> attention_pool_cpu(const Tensor& a_in, const Tensor& weight_in, const Tensor& bias_in,
                                              const Tensor& u_in, double lam, const Tensor& lengths_in) {
  check_forward_inputs(a_in, weight_in, bias_in, u_in, lam, lengths_in);
  check_cpu_inputs(a_in, lengths_in);
  const Tensor a = a_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous(),
               u = u_in.contiguous(), lengths = lengths_in.contiguous();
  Tensor context = at::empty({a.size(0), a.size(2)}, a.options());
  Tensor alpha = at::empty({a.size(0), a.size(1)}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "attention_pool_cpu", [&] {
    forward_cpu_kernel<scalar_t>(a, weight, bias, u, lam, lengths, context, alpha);
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
    backward_cpu_kernel<scalar_t>(grad_context, grad_alpha, a, weight, bias, u, alpha, lam, lengths, grad_a,
                                  grad_weight, grad_bias, grad_u);
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
