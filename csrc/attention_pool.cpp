// Fused attention pooling: operator schemas, input checks, autograd and the CPU registration.
//
// The kernels live elsewhere: cpu/ (narrow path narrow.cpp + isa_kernels.h, wide path wide.cpp, the
// instruction-set choice capability.cpp) and cuda/attention_pool.cu; attention_pool.h holds the math
// they share. This file only checks inputs, picks the CPU path and wires everything into the
// dispatcher: schemas (TORCH_LIBRARY), the CPU kernels (TORCH_LIBRARY_IMPL CPU), autograd in C++
// (TORCH_LIBRARY_IMPL Autograd), and small utility ops for tests and benchmarks (names start with _).
//
// The lengths contract: 1 <= lengths[b] <= L on both devices. The CPU kernels raise on a violation
// (the values are on the host); the CUDA kernels raise a device-side assertion (no host sync), which
// surfaces as a RuntimeError at the next synchronisation, as PyTorch's own index checks do.
#include <ATen/ATen.h>
#include <Python.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu/kernels.h"
#include "waves.h"

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

void check_length_values(const Tensor& lengths, int64_t positions) {
  const Tensor lens = lengths.contiguous();
  const int64_t* len = lens.data_ptr<int64_t>();
  const auto [lo, hi] = std::minmax_element(len, len + lens.numel());
  TORCH_CHECK(*lo >= 1 && *hi <= positions, "attention_pool: `lengths` must lie in 1..L=", positions,
              ", got values in ", *lo, "..", *hi);
}

namespace {

std::atomic<int64_t> wave_override{0};

}  // namespace

int64_t wave_elements(int64_t device_default) {
  const int64_t value = wave_override.load(std::memory_order_relaxed);
  return value > 0 ? value : device_default;
}

int64_t set_wave_elements(int64_t elements) {
  TORCH_CHECK(elements >= 0, "_set_wave_elements: `elements` must be >= 0 (0 = the defaults), got ", elements);
  return wave_override.exchange(elements, std::memory_order_relaxed);
}

namespace {

void check_cpu_inputs(const Tensor& a, const Tensor& lengths) {
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "attention_pool: the CPU kernel supports float32 and float64 `a`, got ", a.scalar_type());
  check_length_values(lengths, a.size(1));
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
    if (cpu::is_narrow(a.size(2), weight.size(0))) {
      cpu::narrow_forward<scalar_t>(a, weight, bias, u, lam, lengths, context, alpha);
    } else {
      cpu::wide_forward<scalar_t>(a, weight, bias, u, lam, lengths, context, alpha);
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
    if (cpu::is_narrow(a.size(2), weight.size(0))) {
      cpu::narrow_backward<scalar_t>(grad_context, grad_alpha, a, weight, bias, u, alpha, lam, lengths, grad_a,
                                     grad_weight, grad_bias, grad_u);
    } else {
      cpu::wide_backward<scalar_t>(grad_context, grad_alpha, a, weight, bias, u, alpha, lam, lengths, grad_a,
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

// The shared activation on its own, computed by the active CPU path's code (tests compare it
// bit for bit with a transcription of the formula in attention_pool.h).
Tensor tanh_cpu(const Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "_tanh: `x` must be float32 or float64, got ", x.scalar_type());
  Tensor out = x.contiguous().clone();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "_tanh_cpu",
                             [&] { cpu::tanh_inplace<scalar_t>(out.data_ptr<scalar_t>(), out.numel()); });
  return out;
}

std::string cpu_capability() { return cpu::capability_name(cpu::active_capability()); }

// The compiled paths this CPU can run, best first.
std::vector<std::string> cpu_capabilities() {
  std::vector<std::string> names;
  for (cpu::Capability c : cpu::compiled_capabilities())
    if (cpu::cpu_supports(c)) names.emplace_back(cpu::capability_name(c));
  return names;
}

std::vector<std::string> compiled_cpu_capabilities() {
  std::vector<std::string> names;
  for (cpu::Capability c : cpu::compiled_capabilities()) names.emplace_back(cpu::capability_name(c));
  return names;
}

}  // namespace

TORCH_LIBRARY(ser_lightning, m) {
  m.def("attention_pool(Tensor a, Tensor weight, Tensor bias, Tensor u, float lam, Tensor lengths)"
        " -> (Tensor context, Tensor alpha)");
  m.def("attention_pool_backward(Tensor grad_context, Tensor grad_alpha, Tensor a, Tensor weight, Tensor bias,"
        " Tensor u, Tensor alpha, float lam, Tensor lengths)"
        " -> (Tensor grad_a, Tensor grad_weight, Tensor grad_bias, Tensor grad_u)");
  m.def("_tanh(Tensor x) -> Tensor");
  m.def("_cpu_capability() -> str", &cpu_capability);
  m.def("_cpu_capabilities() -> str[]", &cpu_capabilities);
  m.def("_compiled_cpu_capabilities() -> str[]", &compiled_cpu_capabilities);
  m.def("_set_cpu_capability(str name) -> ()", [](const std::string& name) { cpu::set_capability(name); });
  m.def("_set_wave_elements(int elements) -> int", &set_wave_elements);
}

TORCH_LIBRARY_IMPL(ser_lightning, CPU, m) {
  m.impl("attention_pool", &attention_pool_cpu);
  m.impl("attention_pool_backward", &attention_pool_backward_cpu);
  m.impl("_tanh", &tanh_cpu);
}

TORCH_LIBRARY_IMPL(ser_lightning, Autograd, m) { m.impl("attention_pool", &attention_pool_autograd); }

}  // namespace ser_lightning
