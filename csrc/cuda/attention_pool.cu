// Fused attention pooling: CUDA kernels.
//
// Design. Positions are cut into tiles of kTileL = 64. One block of 256 threads handles one (tile,
// utterance) pair; the pairs of a launch are flattened onto grid.x, so the batch size is not bounded
// by grid.y. The block projects its tile: z = a_tile W^T is a shared-memory tiled GEMM (64 positions
// x 64 outputs per pass over D, channels staged 16 at a time, 4 x 4 outputs per thread, float32
// accumulation); then the shared activation and the u-dot, each position's score reduced with warp
// shuffles.
//   Forward: the tile kernel writes its scaled scores, its softmax partial (max, sum) and its partial
// context sum_i exp(x_i - max) a_i; the merge kernel (block per utterance) folds the tiles' partials
// into a SoftmaxState with SoftmaxState::merge, the merge the CPU kernels use, then writes alpha and
// the context.
//   Backward: the dot kernel computes s_i = dc . a_i + dalpha_i and per-tile partial sums of
// alpha_i s_i (S = one ATen reduction of them); then, per wave, the tile kernel recomputes the
// projection, forms de_i and dz (into a wave buffer, zero at padding) and per-tile partials of du
// and dbias; dW += dz^T a and da = dz W are cuBLAS GEMMs (ATen) on the wave's rows; finally
// grad_a += alpha dc (alpha is 0 at padding, so padding rows of grad_a are exactly 0).
// The float32 GEMMs are IEEE float32, also when the caller enables TF32 (see the backward's guard).
//   Waves. Transient buffers (the tiles' partial contexts, dz) hold at most
// wave_elements(kCudaWaveElements) values: a wave is a run of whole utterances, or a run of tiles of
// one long utterance, whose softmax state and context sum then carry over to its next wave in a
// (C + 2) buffer. Beyond the inputs and outputs, memory is that bound plus O(B L) float32 (the scores
// for 16-bit types, s) and O(B L / 64) partials.
//   No host synchronisation: the lengths never leave the device (lengths outside 1..L trigger a
// device-side assertion; see attention_pool.cpp), every launch is on the current stream and is
// followed by C10_CUDA_KERNEL_LAUNCH_CHECK(). The arithmetic (tanh, softmax merge, de, dz) is
// attention_pool.h, shared with the CPU kernels and their tests.
//   Limits: any B, L, C, D >= 1 (every load and store is bounds-checked); float32, float16 and
// bfloat16 with float32 accumulation; no float64 (it falls back to the reference in Python).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "attention_pool.h"
#include "checks.h"
#include "waves.h"

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

// lengths[b], which the contract puts in 1..L. A violation stops the kernel with a device-side
// assertion; the clamp only keeps memory accesses in bounds where assertions are compiled out.
__device__ __forceinline__ int64_t checked_length(const int64_t* lengths, int64_t b, int64_t L) {
  const int64_t n = lengths[b];
  CUDA_KERNEL_ASSERT_MSG(n >= 1 && n <= L, "attention_pool: `lengths` must lie in 1..L");
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

// A launch over (tile, utterance) pairs: utterances [b0, b0 + count / tiles), tiles [t0, t0 + tiles)
// of each, pair p = (utterance b0 + p / tiles, tile t0 + p % tiles).
struct PairRange {
  int64_t b0, t0, tiles;
  __device__ int64_t utterance(int64_t pair) const { return b0 + pair / tiles; }
  __device__ int64_t tile(int64_t pair) const { return t0 + pair % tiles; }
};

// Shared-memory tiles of one projection step.
//
// Row padding (kTileStride): the loads in project_tile give the 32 lanes of a warp the pairs
// (row r, channel k) and (r + 1, k) for k = 0..15, stored at k * stride + r. Banks are 4-byte words
// mod 32, so with stride = 64 + 1 lane (r + 1, k) shares a bank with lane (r, k + 1): 2-way
// conflicts on every store. With stride = 64 + 2 the banks are r + 2k and r + 1 + 2k, all 32
// distinct. The reads (s.a[k][ty + 16 p], s.w[k][tx + 16 q]) are broadcasts or 16 consecutive
// words for any stride. Only the layout changes: every index stays below 64.
constexpr int kTileStride = kTileL + 2;
static_assert(kTileL == kTileD, "ProjectionTiles pads both tiles with one stride");
struct ProjectionTiles {
  float a[kTileK][kTileStride];  // a[k][i]: channel k0 + k of position i0 + i
  float w[kTileK][kTileStride];  // w[k][j]: W[d0 + j][k0 + k]
};

// acc[p][q] = z of position i0 + ty + 16 p and output d0 + tx + 16 q (0 outside the tile), where
// (ty, tx) = (threadIdx.x / 16, threadIdx.x % 16). Rows >= rows_valid and outputs >= D read 0.
// Every thread of the block must call it (it synchronises).
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

// Forward, per (tile, utterance) pair: scaled scores, the tile's softmax partial and partial context.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) forward_tile_kernel(
    const scalar_t* __restrict__ a, const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
    const scalar_t* __restrict__ u, float lam, const int64_t* __restrict__ lengths, int64_t L, int64_t C, int64_t D,
    PairRange range, float* __restrict__ scores, float* __restrict__ part_max, float* __restrict__ part_sum,
    float* __restrict__ part_context) {
  __shared__ ProjectionTiles tiles;
  __shared__ float score[kTileL];
  __shared__ float scratch[kWarps];
  const int64_t part = blockIdx.x;
  const int64_t b = range.utterance(part), i0 = range.tile(part) * kTileL;
  const int64_t n = checked_length(lengths, b, L);
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
        if (d < D) e += static_cast<float>(u[d]) * activation<float>(acc[p][q], static_cast<float>(bias[d]));
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

// Forward, block per utterance of the wave: merge the wave's tile partials into the utterance's
// softmax state (starting empty, or from `carry` when an earlier wave held its first tiles); on the
// utterance's last wave write alpha and the context, else store the state in `carry` (C sums, max, sum).
// `scores` and `alpha` may be the same memory (float32), hence no __restrict__ on them.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) forward_merge_kernel(
    const float* scores, const float* __restrict__ part_max, const float* __restrict__ part_sum,
    const float* __restrict__ part_context, const int64_t* __restrict__ lengths, int64_t L, int64_t C,
    PairRange range, bool first, bool last, float* __restrict__ carry, scalar_t* __restrict__ context,
    scalar_t* alpha) {
  const int64_t b = range.b0 + blockIdx.x;
  const int64_t n = checked_length(lengths, b, L);
  const int64_t valid_tiles = (n + kTileL - 1) / kTileL;  // later tiles are padding: empty partials
  const int64_t left = valid_tiles - range.t0;
  const int64_t merged = left < 0 ? 0 : (left < range.tiles ? left : range.tiles);
  const int64_t part0 = blockIdx.x * range.tiles;
  const SoftmaxState<float> start = first ? SoftmaxState<float>::empty() : SoftmaxState<float>{carry[C], carry[C + 1]};
  float scale_self, scale_other;
  SoftmaxState<float> state = start;
  for (int64_t t = 0; t < merged; ++t) state.merge(part_max[part0 + t], part_sum[part0 + t], &scale_self, &scale_other);
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    SoftmaxState<float> running = start;
    float sum = first ? 0.f : carry[c];
    for (int64_t t = 0; t < merged; ++t) {
      running.merge(part_max[part0 + t], part_sum[part0 + t], &scale_self, &scale_other);
      sum = sum * scale_self + part_context[(part0 + t) * C + c] * scale_other;
    }
    if (last) {
      context[b * C + c] = static_cast<scalar_t>(sum / running.sum);
    } else {
      carry[c] = sum;
    }
  }
  if (last) {
    for (int64_t i = threadIdx.x; i < L; i += kThreads)
      alpha[b * L + i] = static_cast<scalar_t>(i < n ? state.weight(scores[b * L + i]) : 0.f);
  } else {
    __syncthreads();  // every thread has read the carried state
    if (threadIdx.x == 0) {
      carry[C] = state.max;
      carry[C + 1] = state.sum;
    }
  }
}

// Lanes per position in backward_dot_kernel: the smallest power of two >= C, at most a warp. A warp
// per position would leave 32 - C lanes idle for narrow features (C = 8 uses a quarter of the warp).
__host__ __device__ inline int dot_group_width(int64_t C) {
  int width = 1;
  while (width < 32 && width < C) width <<= 1;
  return width;
}

// Sum within aligned groups of `width` lanes (a power of two <= 32): xor offsets below width never
// leave the group. Every lane of the warp must call it.
__device__ __forceinline__ float group_sum(float v, int width) {
  for (int offset = width / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

static_assert(kTileL % 32 == 0, "backward_dot_kernel: a tile holds whole warps' worth of positions");

// Backward, per (tile, utterance) pair: s_i = dc . a_i + dalpha_i (a group of dot_group_width(C)
// lanes per position, 32 / width positions per warp) and the tile's part of S = sum_i alpha_i s_i.
// With width = 32 this is the former warp per position, step for step. A narrower group gives the
// same sums: the former reduction added only zeros (lanes >= C) before its last log2(width) steps.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) backward_dot_kernel(
    const scalar_t* __restrict__ grad_context, const scalar_t* __restrict__ grad_alpha,
    const scalar_t* __restrict__ a, const scalar_t* __restrict__ alpha, const int64_t* __restrict__ lengths,
    int64_t L, int64_t C, PairRange range, float* __restrict__ s_out, float* __restrict__ part_s) {
  __shared__ float weighted[kTileL];
  const int64_t part = blockIdx.x;
  const int64_t b = range.utterance(part), i0 = range.tile(part) * kTileL;
  const int64_t n = checked_length(lengths, b, L);
  const int width = dot_group_width(C), per_warp = 32 / width;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int slot = lane / width, member = lane % width;
  // kTileL is a multiple of per_warp (static_assert above), so every lane's i is < kTileL while base
  // is: the loop and the shuffles in it are uniform across the warp; each i < kTileL has one group.
  for (int base = warp * per_warp; base < kTileL; base += kWarps * per_warp) {
    const int i = base + slot;
    const int64_t pos = i0 + i;
    const bool valid = pos < n;
    float s = 0.f;
    if (valid) {
      const scalar_t* a_i = a + (b * L + pos) * C;
      for (int64_t c = member; c < C; c += width)
        s += static_cast<float>(grad_context[b * C + c]) * static_cast<float>(a_i[c]);
    }
    s = group_sum(s, width);  // outside the branch: positions of one warp may differ in validity
    if (member == 0) {
      if (valid) {
        s += static_cast<float>(grad_alpha[b * L + pos]);
        s_out[b * L + pos] = s;
      }
      weighted[i] = valid ? static_cast<float>(alpha[b * L + pos]) * s : 0.f;
    }
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const float v = warp_sum(weighted[threadIdx.x] + weighted[threadIdx.x + 32]);
    if (threadIdx.x == 0) part_s[part] = v;
  }
}

// Backward, per (tile, utterance) pair of a wave: recompute the tile's projection; write dz (rows of
// the wave buffer from row0, zero at padding) and the tile's parts of du and dbias.
//
// __launch_bounds__(kThreads, 3): with the maximum block size alone, ptxas (CUDA 13.0, sm_90) aims at 64
// registers (4 blocks per SM) and spills 12 bytes (a 16-byte stack frame: 3 values reloaded in the
// d0 loop, kept across the calls of the IEEE division's slow path in the activation; the assertion
// call in checked_length adds to the pressure, without it 4 bytes spill). Asking for 3 blocks per SM
// allows up to 85 registers: ptxas then uses 80, with no stack frame and no spill. 3 blocks of 256
// threads (24 warps) is the occupancy the float32 forward tile kernel already has (68 registers).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 3) backward_tile_kernel(
    const scalar_t* __restrict__ a, const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
    const scalar_t* __restrict__ u, const scalar_t* __restrict__ alpha, float lam, const int64_t* __restrict__ lengths,
    int64_t L, int64_t C, int64_t D, PairRange range, int64_t row0, const float* __restrict__ s_in,
    const float* __restrict__ s_total, scalar_t* __restrict__ grad_z, float* __restrict__ part_du,
    float* __restrict__ part_db) {
  __shared__ ProjectionTiles tiles;
  __shared__ float de[kTileL];
  // Rows padded to kTileD + 16 words: a warp writes red[ty][tx + 16 q] for two consecutive ty and
  // tx = 0..15. With rows of 64 words both halves hit the same 16 banks (2-way conflicts); a row
  // stride of 80 words (16 mod 32) moves the second half to the other 16 banks. The column sums
  // read red[r][threadIdx.x], consecutive words: conflict-free either way.
  __shared__ float red_u[16][kTileD + 16];
  __shared__ float red_b[16][kTileD + 16];
  const int64_t part = blockIdx.x;
  const int64_t b = range.utterance(part), i0 = range.tile(part) * kTileL;
  const int64_t n = checked_length(lengths, b, L);
  const int rows = static_cast<int>(L - i0 < kTileL ? L - i0 : kTileL);
  const int rows_valid = static_cast<int>(n <= i0 ? 0 : (n - i0 < kTileL ? n - i0 : kTileL));
  if (threadIdx.x < kTileL) {
    const int i = threadIdx.x;
    de[i] = i < rows_valid ? score_grad<float>(lam, static_cast<float>(alpha[b * L + i0 + i]), s_in[b * L + i0 + i],
                                               s_total[b])
                           : 0.f;
  }
  __syncthreads();
  const scalar_t* a_tile = a + (b * L + i0) * C;
  scalar_t* z_tile = grad_z + (b * L + i0 - row0) * D;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int64_t d0 = 0; d0 < D; d0 += kTileD) {
    float acc[4][4] = {};
    if (rows_valid > 0) project_tile(a_tile, weight, rows_valid, C, D, d0, tiles, acc);  // uniform branch
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
        z_tile[i * D + d] = static_cast<scalar_t>(dz);
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

template <typename scalar_t>
__global__ void tanh_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t n) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x)
    out[k] = sl_tanh(x[k]);
}

// ---------------------------------------------------------------------------------------------
// Host side

// One wave: utterances [b0, b1) x tiles [t0, t1) of each.
struct Wave {
  int64_t b0, b1, t0, t1;
  int64_t pairs() const { return (b1 - b0) * (t1 - t0); }
  PairRange range() const { return {b0, t0, t1 - t0}; }
  // Its rows of the (B L, D) positions: contiguous, from first_row().
  int64_t first_row(int64_t L) const { return b0 * L + t0 * kTileL; }
  int64_t rows(int64_t L) const { return (b1 - b0 - 1) * L + std::min(L, t1 * kTileL) - t0 * kTileL; }
};

// Waves over B utterances of T tiles each such that every wave's pairs x per_pair values fit the
// budget: runs of whole utterances when one fits, else runs of tiles of one utterance.
std::vector<Wave> plan_waves(int64_t B, int64_t T, int64_t per_pair) {
  const int64_t max_pairs = std::max<int64_t>(1, wave_elements(kCudaWaveElements) / per_pair);
  std::vector<Wave> waves;
  if (T <= max_pairs) {
    const int64_t per_wave = max_pairs / T;
    for (int64_t b0 = 0; b0 < B; b0 += per_wave) waves.push_back({b0, std::min(B, b0 + per_wave), 0, T});
  } else {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t0 = 0; t0 < T; t0 += max_pairs) waves.push_back({b, b + 1, t0, std::min(T, t0 + max_pairs)});
  }
  return waves;
}

int64_t tiles_of(int64_t L) { return (L + kTileL - 1) / kTileL; }

void check_cuda_inputs(const Tensor& a) {
  TORCH_CHECK(a.is_cuda(), "attention_pool: `a` must be a CUDA tensor for the CUDA kernel");
  const auto dtype = a.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "attention_pool: the CUDA kernel supports float32, float16 and bfloat16 `a`, got ", dtype);
  // One block per (tile, utterance) pair of the backward dot kernel, on grid.x.
  TORCH_CHECK(a.size(0) * tiles_of(a.size(1)) <= std::numeric_limits<int32_t>::max(),
              "attention_pool: `a` has too many positions for the CUDA kernel: ", a.sizes());
}

std::tuple<Tensor, Tensor> attention_pool_cuda(const Tensor& a_in, const Tensor& weight_in, const Tensor& bias_in,
                                               const Tensor& u_in, double lam, const Tensor& lengths_in) {
  check_forward_inputs(a_in, weight_in, bias_in, u_in, lam, lengths_in);
  check_cuda_inputs(a_in);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const Tensor a = a_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous(),
               u = u_in.contiguous(), lengths = lengths_in.contiguous();
  const int64_t B = a.size(0), L = a.size(1), C = a.size(2), D = weight.size(0), T = tiles_of(L);
  const auto f32 = a.options().dtype(at::kFloat);
  Tensor context = at::empty({B, C}, a.options());
  Tensor alpha = at::empty({B, L}, a.options());
  // float32 alpha holds the scaled scores until the merge overwrites them with the weights.
  const Tensor scores = a.scalar_type() == at::kFloat ? alpha : at::empty({B, L}, f32);
  const std::vector<Wave> waves = plan_waves(B, T, C + 2);
  int64_t max_pairs = 0;
  for (const Wave& w : waves) max_pairs = std::max(max_pairs, w.pairs());
  Tensor part_max = at::empty({max_pairs}, f32), part_sum = at::empty({max_pairs}, f32);
  Tensor part_context = at::empty({max_pairs, C}, f32);
  Tensor carry = at::empty({C + 2}, f32);  // the state of a split utterance between its waves
  const auto stream = c10::cuda::getCurrentCUDAStream();
  SL_DISPATCH_CUDA_TYPES(a.scalar_type(), "attention_pool_cuda", [&] {
    for (const Wave& w : waves) {
      forward_tile_kernel<scalar_t><<<w.pairs(), kThreads, 0, stream>>>(
          a.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
          static_cast<float>(lam), lengths.data_ptr<int64_t>(), L, C, D, w.range(), scores.data_ptr<float>(),
          part_max.data_ptr<float>(), part_sum.data_ptr<float>(), part_context.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      forward_merge_kernel<scalar_t><<<w.b1 - w.b0, kThreads, 0, stream>>>(
          scores.data_ptr<float>(), part_max.data_ptr<float>(), part_sum.data_ptr<float>(),
          part_context.data_ptr<float>(), lengths.data_ptr<int64_t>(), L, C, w.range(), w.t0 == 0, w.t1 == T,
          carry.data_ptr<float>(), context.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
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
  const bool is_float = a.scalar_type() == at::kFloat;
  const auto f32 = a.options().dtype(at::kFloat);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // The float32 GEMMs below (dW, da) run in IEEE float32 whatever the global TF32 setting
  // (torch.backends.cuda.matmul.fp32_precision, torch.set_float32_matmul_precision): the forward's
  // projection is an IEEE float32 GEMM of its own, and the documented float32 accuracy (1e-4 of the
  // float64 reference) needs both. TF32 rounds the GEMM inputs to 10 mantissa bits, about 1e-3 relative
  // error at these sizes. The guard is thread-local and restores the previous state when it ends.
  const at::NoTF32Guard no_tf32;

  // s_i and S for every utterance (S needs all of its positions before any de_i).
  Tensor s = at::empty({B, L}, f32), part_s = at::empty({B, T}, f32);
  SL_DISPATCH_CUDA_TYPES(a.scalar_type(), "attention_pool_backward_dot", [&] {
    backward_dot_kernel<scalar_t><<<B * T, kThreads, 0, stream>>>(
        grad_context.data_ptr<scalar_t>(), grad_alpha.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
        alpha.data_ptr<scalar_t>(), lengths.data_ptr<int64_t>(), L, C, PairRange{0, 0, T}, s.data_ptr<float>(),
        part_s.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const Tensor s_total = part_s.sum(1);

  // Per wave: dz, then the GEMMs on the wave's rows. float32 sums dW in grad_weight itself.
  Tensor grad_a = at::empty_like(a);
  Tensor grad_weight_sum = is_float ? at::zeros_like(weight) : at::zeros({D, C}, f32);
  Tensor grad_u_sum = at::zeros({D}, f32), grad_bias_sum = at::zeros({D}, f32);
  const std::vector<Wave> waves = plan_waves(B, T, int64_t(kTileL) * D);
  int64_t max_pairs = 0, max_rows = 0;
  for (const Wave& w : waves) {
    max_pairs = std::max(max_pairs, w.pairs());
    max_rows = std::max(max_rows, w.rows(L));
  }
  Tensor grad_z = at::empty({max_rows, D}, a.options());  // dz of a wave, zero at padding
  Tensor part_du = at::empty({max_pairs, D}, f32), part_db = at::empty({max_pairs, D}, f32);
  const Tensor a2d = a.view({B * L, C}), ga2d = grad_a.view({B * L, C});
  for (const Wave& w : waves) {
    const int64_t row0 = w.first_row(L), rows = w.rows(L);
    SL_DISPATCH_CUDA_TYPES(a.scalar_type(), "attention_pool_backward_tile", [&] {
      backward_tile_kernel<scalar_t><<<w.pairs(), kThreads, 0, stream>>>(
          a.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
          alpha.data_ptr<scalar_t>(), static_cast<float>(lam), lengths.data_ptr<int64_t>(), L, C, D, w.range(), row0,
          s.data_ptr<float>(), s_total.data_ptr<float>(), grad_z.data_ptr<scalar_t>(), part_du.data_ptr<float>(),
          part_db.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const Tensor z = grad_z.narrow(0, 0, rows), a_rows = a2d.narrow(0, row0, rows);
    if (is_float) {
      grad_weight_sum.addmm_(z.t(), a_rows);
    } else {
      grad_weight_sum.add_(at::mm(z.t(), a_rows));
    }
    Tensor ga_rows = ga2d.narrow(0, row0, rows);
    at::mm_out(ga_rows, z, weight);
    grad_u_sum.add_(part_du.narrow(0, 0, w.pairs()).sum(0));
    grad_bias_sum.add_(part_db.narrow(0, 0, w.pairs()).sum(0));
  }
  grad_a.addcmul_(alpha.unsqueeze(2), grad_context.unsqueeze(1));  // alpha is 0 at padding
  const auto dtype = a.scalar_type();
  return {grad_a, grad_weight_sum.to(dtype), grad_bias_sum.to(dtype), grad_u_sum.to(dtype)};
}

Tensor tanh_cuda(const Tensor& x_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "_tanh: `x` must be float32 or float64, got ", x_in.scalar_type());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "_tanh_cuda", [&] {
    tanh_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ser_lightning, CUDA, m) {
  m.impl("attention_pool", &attention_pool_cuda);
  m.impl("attention_pool_backward", &attention_pool_backward_cuda);
  m.impl("_tanh", &tanh_cuda);
}

}  // namespace ser_lightning
