// Host-side input checks shared by the CPU and CUDA registrations; messages name the argument.
#pragma once

#include <ATen/core/Tensor.h>

namespace ser_lightning {

// Shapes, dtypes, devices and lam. They never read tensor values, so they cost no device sync.
void check_forward_inputs(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& u, double lam, const at::Tensor& lengths);
void check_backward_inputs(const at::Tensor& grad_context, const at::Tensor& grad_alpha, const at::Tensor& a,
                           const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& u,
                           const at::Tensor& alpha, double lam, const at::Tensor& lengths);

// The lengths contract, 1 <= lengths[b] <= L, for host tensors (reads the values). On CUDA the
// kernels check it themselves (a device-side assertion) so that no call waits for the GPU.
void check_length_values(const at::Tensor& lengths, int64_t positions);

}  // namespace ser_lightning
