// Transient buffers of the kernels (projected activations, tile partials, dz) are processed in waves
// of at most wave_elements(...) values, so the memory a call needs beyond its inputs and outputs is
// bounded for any L. Each device has its default (CPU: cache-sized; CUDA: large enough that the
// GEMMs of a wave fill the GPU); tests override it (op `_set_wave_elements`) to exercise waves that
// split utterances on small inputs.
#pragma once

#include <cstdint>

namespace ser_lightning {

constexpr int64_t kCpuWaveElements = int64_t(1) << 20;   // 4 MiB of float32
constexpr int64_t kCudaWaveElements = int64_t(1) << 24;  // 64 MiB of float32

// The override when one is set, else device_default.
int64_t wave_elements(int64_t device_default);
// Sets the override (>= 1; 0 restores the defaults); returns the previous override (0 if none).
int64_t set_wave_elements(int64_t elements);

}  // namespace ser_lightning
