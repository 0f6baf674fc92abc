// Fused attention pooling: CUDA kernels.
//
// Design. Positions are cut into tiles of kTileL = 64; one block of 256 threads handles one
// (tile, utterance) pair, grid = (ceil(L / 64), B). The block projects its tile in registers:
// z = a_tile W^T is a shared-memory tiled GEMM (64 positions x 64 outputs per pass over D,
// channels staged 16 at a time, 4 x 4 outputs per thread, float32 accumulation), then applies
// tanh and the u-dot and reduces each position's score with warp shuffles. Forward: the block
// writes its scaled scores, its softmax partial (max, sum) and its partial context
// sum_i exp(x_i - max) a_i; a second small kernel (block per utterance) merges the partials of
// all tiles (online-softmax rescale), normalises alpha and writes the context. Backward: one
// kernel computes s_i = dc . a_i + dalpha_i and per-tile partials of S = sum alpha_i s_i; a
// second recomputes the tile's projection, forms de_i and dz (written to a transient (B, L, D)
// buffer, zero at padding) and per-tile partials of du and dbias; dW = dz^T a and da = dz W +
// alpha dc are then cuBLAS GEMMs (ATen). The arithmetic (tanh, softmax merge, de, dz) comes from
// attention_pool.h, shared with the CPU kernel.
//
// Limits: B <= 65535 utterances (grid.y, checked); any L, C, D >= 1 (tiles and loops cover them,
// every load and store is bounds-checked). float64 is not supported on CUDA. The raw CUDA operator does not read `lengths` back to the host
// (that would synchronise); it clamps them into 1..L. The Python wrapper validates them.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attention_pool.h"

namespace ser_lightning {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kTileL = 64;  // positions per block
constexpr int kTileD = 64;  // projection outputs per pass
constexpr int kTileK = 16;  // channels staged in shared memory per step
constexpr int kWarps = kThreads / 32;

// float32, float16 and bfloat16 (no float64 instantiations).
#define SL_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                                       \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)            \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)         \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

__device__ __forceinline__ int64_t valid_length(const int64_t* lengths, int64_t b, int64_t L) {
  const int64_t n = lengths[b];
  return n < 1 ? 1 : (n > L ? L : n);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Block-wide sum / max of one value per thread; every thread gets the result.
__device__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

__device__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float m = neg_infinity<float>();
  for (int w = 0; w < kWarps; ++w) m = fmaxf(m, scratch[w]);
  return m;
}

// Shared-memory tiles of one projection step.
struct ProjectionTiles {
  float a[kTileK][kTileL + 1];  // a[k][i]: channel k0 + k of position i0 + i
  float w[kTileK][kTileD + 1];  // w[k][j]: W[d0 + j][k0 + k]
};

// acc[p][q] = z of position i0 + ty + 16 p and output d0 + tx + 16 q (0 outside the tile), where
// (ty, tx) = (threadIdx.x / 16, threadIdx.x % 16). Rows >= rows_valid and outputs >= D read 0.
template <typename scalar_t>
__device__ void project_tile(const scalar_t* __restrict__ a_tile, const scalar_t* __restrict__ weight,
                             int rows_valid, int64_t C, int64_t D, int64_t d0, ProjectionTiles& s,
                             float acc[4][4]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int p = 0; p < 4; ++p)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[p][q] = 0.f;
  for (int64_t k0 = 0; k0 < C; k0 += kTileK) {
    for (int idx = threadIdx.x; idx < kTileL * kTileK; idx += kThreads) {
      const int i = idx / kTileK, k = idx % kTileK;
      s.a[k][i] = (i < rows_valid && k0 + k < C) ? static_cast<float>(a_tile[i * C + k0 + k]) : 0.f;
    }
    for (int idx = threadIdx.x; idx < kTileD * kTileK; idx += kThreads) {
      const int j = idx / kTileK, k = idx % kTileK;
      s.w[k][j] = (d0 + j < D && k0 + k < C) ? static_cast<float>(weight[(d0 + j) * C + k0 + k]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      float av[4], wv[4];
#pragma unroll
      for (int p = 0; p < 4; ++p) av[p] = s.a[k][ty + 16 * p];
#pragma unroll
      for (int q = 0; q < 4; ++q) wv[q] = s.w[k][tx + 16 * q];
#pragma unroll
      for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[p][q] += av[p] * wv[q];
    }
    __syncthreads();
  }
}

// Forward pass 1: scores, softmax partial and partial context of one (tile, utterance).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) forward_tile_kernel(
    const scalar_t* __restrict__ a, const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
    const scalar_t* __restrict__ u, float lam, const int64_t* __restrict__ lengths, int64_t L, int64_t C, int64_t D,
    float* __restrict__ scores, float* __restrict__ part_max, float* __restrict__ part_sum,
    float* __restrict__ part_context) {
  __shared__ ProjectionTiles tiles;
  __shared__ float score[kTileL];
  __shared__ float scratch[kWarps];
  const int64_t b = blockIdx.y, tile = blockIdx.x, tiles_per_row = gridDim.x;
  const int64_t i0 = tile * kTileL;
  const int64_t n = valid_length(lengths, b, L);
  const int64_t part = b * tiles_per_row + tile;
  if (i0 >= n) {  // a tile of padding: an empty partial (uniform branch for the whole block)
    if (threadIdx.x == 0) {
      part_max[part] = neg_infinity<float>();
      part_sum[part] = 0.f;
    }
    for (int64_t c = threadIdx.x; c < C; c += kThreads) part_context[part * C + c] = 0.f;
    return;
  }
  const int rows_valid = static_cast<int>(n - i0 < kTileL ? n - i0 : kTileL);
  const scalar_t* a_tile = a + (b * L + i0) * C;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  if (threadIdx.x < kTileL) score[threadIdx.x] = 0.f;
  __syncthreads();
  for (int64_t d0 = 0; d0 < D; d0 += kTileD) {
    float acc[4][4];
    project_tile(a_tile, weight, rows_valid, C, D, d0, tiles, acc);
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      float e = 0.f;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t d = d0 + tx + 16 * q;
        if (d < D) {
          e += static_cast<float>(u[d]) * activation<float>(acc[p][q], static_cast<float>(bias[d]));
        }
      }
      // The 16 threads of one ty hold the same positions: reduce over tx (lanes differing in bits 0-3).
      for (int offset = 8; offset > 0; offset >>= 1) e += __shfl_xor_sync(0xffffffffu, e, offset);
      if (tx == 0) score[ty + 16 * p] += e;  // each position has exactly one writer
    }
  }
  __syncthreads();
  // Scaled scores, tile maximum and exp-weights (kTileL <= kThreads).
  float x = neg_infinity<float>();
  if (threadIdx.x < rows_valid) {
    x = lam * score[threadIdx.x];
    scores[b * L + i0 + threadIdx.x] = x;
  }
  const float tile_max = block_max(x, scratch);
  const float w = threadIdx.x < rows_valid ? sl_exp(x - tile_max) : 0.f;
  const float tile_sum = block_sum(w, scratch);
  __syncthreads();
  if (threadIdx.x < kTileL) score[threadIdx.x] = w;
  __syncthreads();
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    float ctx = 0.f;
    for (int i = 0; i < rows_valid; ++i) ctx += score[i] * static_cast<float>(a_tile[i * C + c]);
    part_context[part * C + c] = ctx;
  }
  if (threadIdx.x == 0) {
    part_max[part] = tile_max;
    part_sum[part] = tile_sum;
  }
}

// Forward pass 2 (block per utterance): merge the tiles' partials, write alpha and the context.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) forward_merge_kernel(
    const float* __restrict__ scores, const float* __restrict__ part_max, const float* __restrict__ part_sum,
    const float* __restrict__ part_context, const int64_t* __restrict__ lengths, int64_t L, int64_t C,
    int64_t tiles_per_row, scalar_t* __restrict__ context, scalar_t* __restrict__ alpha) {
  __shared__ float scratch[kWarps];
  const int64_t b = blockIdx.x;
  const int64_t n = valid_length(lengths, b, L);
  const int64_t tiles = (n + kTileL - 1) / kTileL;
  const float* pm = part_max + b * tiles_per_row;
  const float* ps = part_sum + b * tiles_per_row;
  // Rescale every tile's partial to the utterance maximum (tiles of padding are not visited).
  SoftmaxState<float> state;
  float m = neg_infinity<float>();
  for (int64_t t = threadIdx.x; t < tiles; t += kThreads) m = fmaxf(m, pm[t]);
  m = block_max(m, scratch);
  float partial = 0.f;
  for (int64_t t = threadIdx.x; t < tiles; t += kThreads) partial += ps[t] * sl_exp(pm[t] - m);
  state.max = m;
  state.sum = block_sum(partial, scratch);
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    float ctx = 0.f;
    for (int64_t t = 0; t < tiles; ++t) ctx += part_context[(b * tiles_per_row + t) * C + c] * sl_exp(pm[t] - m);
    context[b * C + c] = static_cast<scalar_t>(ctx / state.sum);
  }
  for (int64_t i = threadIdx.x; i < L; i += kThreads) {
    alpha[b * L + i] = static_cast<scalar_t>(i < n ? state.weight(scores[b * L + i]) : 0.f);
  }
}

// Backward pass 1: s_i = dc . a_i + dalpha_i (warp per position) and the tile's part of S.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) backward_dot_kernel(
    const scalar_t* __restrict__ grad_context, const scalar_t* __restrict__ grad_alpha,
    const scalar_t* __restrict__ a, const scalar_t* __restrict__ alpha, const int64_t* __restrict__ lengths,
    int64_t L, int64_t C, float* __restrict__ s_out, float* __restrict__ part_s) {
  __shared__ float weighted[kTileL];
  const int64_t b = blockIdx.y, i0 = static_cast<int64_t>(blockIdx.x) * kTileL;
  const int64_t n = valid_length(lengths, b, L);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int i = warp; i < kTileL; i += kWarps) {
    const int64_t pos = i0 + i;
    float s = 0.f;
    if (pos < n) {
      const scalar_t* a_i = a + (b * L + pos) * C;
      for (int64_t c = lane; c < C; c += 32) s += static_cast<float>(grad_context[b * C + c]) * static_cast<float>(a_i[c]);
      s = warp_sum(s) + static_cast<float>(grad_alpha[b * L + pos]);
      if (lane == 0) s_out[b * L + pos] = s;
    }
    if (lane == 0) weighted[i] = pos < n ? static_cast<float>(alpha[b * L + pos]) * s : 0.f;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = weighted[threadIdx.x] + weighted[threadIdx.x + 32];
    v = warp_sum(v);
    if (threadIdx.x == 0) part_s[b * gridDim.x + blockIdx.x] = v;
  }
}

// Backward pass 2: recompute the tile's projection; write dz and the tile's parts of du, dbias.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) backward_tile_kernel(
    const scalar_t* __restrict__ a, const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
    const scalar_t* __restrict__ u, const scalar_t* __restrict__ alpha, float lam, const int64_t* __restrict__ lengths,
    int64_t L, int64_t C, int64_t D, const float* __restrict__ s_in, const float* __restrict__ part_s,
    scalar_t* __restrict__ grad_z, float* __restrict__ part_du, float* __restrict__ part_db) {
  __shared__ ProjectionTiles tiles;
  __shared__ float de[kTileL];
  __shared__ float red_u[16][kTileD];
  __shared__ float red_b[16][kTileD];
  __shared__ float scratch[kWarps];
  const int64_t b = blockIdx.y, tile = blockIdx.x, tiles_per_row = gridDim.x;
  const int64_t i0 = tile * kTileL;
  const int64_t n = valid_length(lengths, b, L);
  const int64_t part = b * tiles_per_row + tile;
  const int rows = static_cast<int>(L - i0 < kTileL ? L - i0 : kTileL);
  const int rows_valid = static_cast<int>(n <= i0 ? 0 : (n - i0 < kTileL ? n - i0 : kTileL));
  float s_total = 0.f;
  for (int64_t t = threadIdx.x; t < tiles_per_row; t += kThreads) s_total += part_s[b * tiles_per_row + t];
  s_total = block_sum(s_total, scratch);
  if (threadIdx.x < kTileL) {
    const int i = threadIdx.x;
    de[i] = i < rows_valid ? score_grad<float>(lam, static_cast<float>(alpha[b * L + i0 + i]), s_in[b * L + i0 + i],
                                               s_total)
                           : 0.f;
  }
  __syncthreads();
  const scalar_t* a_tile = a + (b * L + i0) * C;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int64_t d0 = 0; d0 < D; d0 += kTileD) {
    float acc[4][4];
    if (rows_valid > 0) {  // uniform across the block
      project_tile(a_tile, weight, rows_valid, C, D, d0, tiles, acc);
    }
    float du_part[4] = {0.f, 0.f, 0.f, 0.f}, db_part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const int i = ty + 16 * p;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t d = d0 + tx + 16 * q;
        if (d >= D || i >= rows) continue;
        float dz = 0.f;
        if (i < rows_valid) {
          const float h = activation<float>(acc[p][q], static_cast<float>(bias[d]));
          du_part[q] += de[i] * h;
          dz = preactivation_grad<float>(de[i], static_cast<float>(u[d]), h);
          db_part[q] += dz;
        }
        grad_z[(b * L + i0 + i) * D + d] = static_cast<scalar_t>(dz);
      }
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      red_u[ty][tx + 16 * q] = du_part[q];
      red_b[ty][tx + 16 * q] = db_part[q];
    }
    __syncthreads();
    if (threadIdx.x < kTileD && d0 + threadIdx.x < D) {
      float su = 0.f, sb = 0.f;
      for (int r = 0; r < 16; ++r) {
        su += red_u[r][threadIdx.x];
        sb += red_b[r][threadIdx.x];
      }
      part_du[part * D + d0 + threadIdx.x] = su;
      part_db[part * D + d0 + threadIdx.x] = sb;
    }
    __syncthreads();
  }
}

void check_cuda_inputs(const Tensor& a) {
  TORCH_CHECK(a.is_cuda(), "attention_pool: `a` must be a CUDA tensor for the CUDA kernel");
  const auto dtype = a.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "attention_pool: the CUDA kernel supports float32, float16 and bfloat16 `a`, got ", dtype);
  TORCH_CHECK(a.size(0) <= 65535, "attention_pool: the CUDA kernel supports B <= 65535 utterances in `a`, got ",
              a.size(0));
}

int64_t tiles_of(int64_t L) { return (L + kTileL - 1) / kTileL; }

std::tuple<Tensor, Tensor> attention_pool_cuda(const Tensor& a_in, const Tensor& weight_in, const Tensor& bias_in,
                                               const Tensor& u_in, double lam, const Tensor& lengths_in) {
  check_forward_inputs(a_in, weight_in, bias_in, u_in, lam, lengths_in);
  check_cuda_inputs(a_in);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const Tensor a = a_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous(),
               u = u_in.contiguous(), lengths = lengths_in.contiguous();
  const int64_t B = a.size(0), L = a.size(1), C = a.size(2), D = weight.size(0), T = tiles_of(L);
  const auto f32 = a.options().dtype(at::kFloat);
  Tensor scores = at::empty({B, L}, f32);
  Tensor part_max = at::empty({B, T}, f32), part_sum = at::empty({B, T}, f32);
  Tensor part_context = at::empty({B, T, C}, f32);
  Tensor context = at::empty({B, C}, a.options());
  Tensor alpha = at::empty({B, L}, a.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  SL_DISPATCH_CUDA_TYPES(a.scalar_type(), "attention_pool_cuda", [&] {
    forward_tile_kernel<scalar_t><<<dim3(T, B), kThreads, 0, stream>>>(
        a.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
        static_cast<float>(lam), lengths.data_ptr<int64_t>(), L, C, D, scores.data_ptr<float>(),
        part_max.data_ptr<float>(), part_sum.data_ptr<float>(), part_context.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    forward_merge_kernel<scalar_t><<<B, kThreads, 0, stream>>>(
        scores.data_ptr<float>(), part_max.data_ptr<float>(), part_sum.data_ptr<float>(),
        part_context.data_ptr<float>(), lengths.data_ptr<int64_t>(), L, C, T, context.data_ptr<scalar_t>(),
        alpha.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {context, alpha};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_pool_backward_cuda(
    const Tensor& grad_context_in, const Tensor& grad_alpha_in, const Tensor& a_in, const Tensor& weight_in,
    const Tensor& bias_in, const Tensor& u_in, const Tensor& alpha_in, double lam, const Tensor& lengths_in) {
  check_backward_inputs(grad_context_in, grad_alpha_in, a_in, weight_in, bias_in, u_in, alpha_in, lam, lengths_in);
  check_cuda_inputs(a_in);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const Tensor grad_context = grad_context_in.contiguous(), grad_alpha = grad_alpha_in.contiguous(),
               a = a_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous(),
               u = u_in.contiguous(), alpha = alpha_in.contiguous(), lengths = lengths_in.contiguous();
  const int64_t B = a.size(0), L = a.size(1), C = a.size(2), D = weight.size(0), T = tiles_of(L);
  const auto f32 = a.options().dtype(at::kFloat);
  Tensor s = at::empty({B, L}, f32);
  Tensor part_s = at::empty({B, T}, f32);
  Tensor part_du = at::empty({B * T, D}, f32), part_db = at::empty({B * T, D}, f32);
  Tensor grad_z = at::empty({B, L, D}, a.options());  // transient: dz, zero at padding
  const auto stream = c10::cuda::getCurrentCUDAStream();
  SL_DISPATCH_CUDA_TYPES(a.scalar_type(), "attention_pool_backward_cuda", [&] {
    backward_dot_kernel<scalar_t><<<dim3(T, B), kThreads, 0, stream>>>(
        grad_context.data_ptr<scalar_t>(), grad_alpha.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
        alpha.data_ptr<scalar_t>(), lengths.data_ptr<int64_t>(), L, C, s.data_ptr<float>(), part_s.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    backward_tile_kernel<scalar_t><<<dim3(T, B), kThreads, 0, stream>>>(
        a.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
        alpha.data_ptr<scalar_t>(), static_cast<float>(lam), lengths.data_ptr<int64_t>(), L, C, D,
        s.data_ptr<float>(), part_s.data_ptr<float>(), grad_z.data_ptr<scalar_t>(), part_du.data_ptr<float>(),
        part_db.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const Tensor z2d = grad_z.view({B * L, D}), a2d = a.view({B * L, C});
  Tensor grad_weight = at::mm(z2d.t(), a2d);
  Tensor grad_a = at::mm(z2d, weight).view({B, L, C});
  grad_a.addcmul_(alpha.unsqueeze(2), grad_context.unsqueeze(1));  // alpha is 0 at padding
  Tensor grad_bias = part_db.sum(0).to(a.scalar_type());
  Tensor grad_u = part_du.sum(0).to(a.scalar_type());
  return {grad_a, grad_weight, grad_bias, grad_u};
}

}  // namespace

TORCH_LIBRARY_IMPL(ser_lightning, CUDA, m) {
  m.impl("attention_pool", &attention_pool_cuda);
  m.impl("attention_pool_backward", &attention_pool_backward_cuda);
}

}  // namespace ser_lightning
