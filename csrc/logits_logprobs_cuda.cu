// CUDA kernels of tpo_fast.logits_logprobs: one block per row, 16-byte vector loads, an online
// max / sum-exp per thread, then a warp-shuffle and shared-memory merge of the (max, sum) pairs.
// Memory-bound by design: each logit is read once in forward and read once + written once in backward.
#include "logits_logprobs.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace tpo_fast {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kPacksPerThread = 8;

// 16-byte packs: 4 fp32 or 8 bf16/fp16 logits, unpacked to fp32 in registers.
template <typename T>
struct Packed;

template <>
struct Packed<float> {
  static constexpr int kSize = 4;
  __device__ __forceinline__ static void unpack(const uint4& r, float* f) {
    f[0] = __uint_as_float(r.x);
    f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z);
    f[3] = __uint_as_float(r.w);
  }
  __device__ __forceinline__ static uint4 pack(const float* f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

template <>
struct Packed<c10::BFloat16> {
  static constexpr int kSize = 8;
  __device__ __forceinline__ static void unpack2(uint32_t w, float* f) {
    f[0] = __uint_as_float(w << 16);
    f[1] = __uint_as_float(w & 0xFFFF0000u);
  }
  __device__ __forceinline__ static uint32_t pack2(const float* f) {
    const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(f[0]));
    const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(f[1]));
    return lo | (hi << 16);
  }
  __device__ __forceinline__ static void unpack(const uint4& r, float* f) {
    unpack2(r.x, f);
    unpack2(r.y, f + 2);
    unpack2(r.z, f + 4);
    unpack2(r.w, f + 6);
  }
  __device__ __forceinline__ static uint4 pack(const float* f) {
    return make_uint4(pack2(f), pack2(f + 2), pack2(f + 4), pack2(f + 6));
  }
};

template <>
struct Packed<c10::Half> {
  static constexpr int kSize = 8;
  __device__ __forceinline__ static void unpack2(uint32_t w, float* f) {
    f[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xFFFFu)));
    f[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  __device__ __forceinline__ static uint32_t pack2(const float* f) {
    const uint32_t lo = __half_as_ushort(__float2half_rn(f[0]));
    const uint32_t hi = __half_as_ushort(__float2half_rn(f[1]));
    return lo | (hi << 16);
  }
  __device__ __forceinline__ static void unpack(const uint4& r, float* f) {
    unpack2(r.x, f);
    unpack2(r.y, f + 2);
    unpack2(r.z, f + 4);
    unpack2(r.w, f + 6);
  }
  __device__ __forceinline__ static uint4 pack(const float* f) {
    return make_uint4(pack2(f), pack2(f + 2), pack2(f + 4), pack2(f + 6));
  }
};

// exp(x - shift), with exp(0) = 1 where x equals the shift even when both are +inf: a row with a +inf logit
// then has lse +inf (torch.logsumexp), not the NaN of exp(inf - inf). A NaN x stays NaN.
__device__ __forceinline__ float exp_from(float x, float shift) { return __expf(x == shift ? 0.0f : x - shift); }

// Merge a (max, sum-exp) pair into (m, s). fmaxf skips NaN, which reaches s through __expf instead;
// `shift` keeps exp(-inf - -inf) out of pairs that are still all -inf.
__device__ __forceinline__ void merge(float& m, float& s, float om, float os) {
  const float m_new = fmaxf(m, om);
  const float shift = m_new == -INFINITY ? 0.0f : m_new;
  s = s * exp_from(m, shift) + os * exp_from(om, shift);
  m = m_new;
}

__device__ __forceinline__ void update(float& m, float& s, float x) { merge(m, s, x, 1.0f); }

// Leaves the block's (max, sum-exp) in thread 0. blockDim.x is a multiple of 32.
__device__ __forceinline__ void block_merge(float& m, float& s) {
  __shared__ float sh_m[kMaxThreads / 32];
  __shared__ float sh_s[kMaxThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, m, off);
    const float os = __shfl_xor_sync(0xffffffffu, s, off);
    merge(m, s, om, os);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  if (lane == 0) {
    sh_m[warp] = m;
    sh_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < n_warps ? sh_m[lane] : -INFINITY;
    s = lane < n_warps ? sh_s[lane] : 0.0f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float om = __shfl_xor_sync(0xffffffffu, m, off);
      const float os = __shfl_xor_sync(0xffffffffu, s, off);
      merge(m, s, om, os);
    }
  }
}

template <typename T>
__device__ __forceinline__ int64_t aligned_head(const T* p, int64_t V) {
  const int64_t bytes = (16 - static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 16)) % 16;
  return min(bytes / static_cast<int64_t>(sizeof(T)), V);
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    logits_forward_kernel(const T* __restrict__ logits, int64_t stride, const int64_t* __restrict__ targets,
                          int64_t V, int64_t ignore_index, float* __restrict__ lse, float* __restrict__ z) {
  constexpr int kPack = Packed<T>::kSize;
  const int64_t row = blockIdx.x;
  const int64_t t = targets[row];
  if (t == ignore_index) {  // uniform over the block: no vocabulary work
    if (threadIdx.x == 0) {
      lse[row] = 0.0f;
      z[row] = 0.0f;
    }
    return;
  }
  const T* x = logits + row * stride;
  // 1. per-thread online max / sum-exp: scalar head to a 16-byte boundary, 16-byte packs, scalar tail
  float m = -INFINITY, s = 0.0f;
  const int64_t head = aligned_head(x, V);
  const int64_t n_packs = (V - head) / kPack;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) update(m, s, static_cast<float>(x[i]));
  const uint4* packs = reinterpret_cast<const uint4*>(x + head);
#pragma unroll 2
  for (int64_t i = threadIdx.x; i < n_packs; i += blockDim.x) {
    float v[kPack];
    Packed<T>::unpack(__ldg(packs + i), v);
    float pm = v[0];
#pragma unroll
    for (int j = 1; j < kPack; ++j) pm = fmaxf(pm, v[j]);
    const float m_new = fmaxf(m, pm);
    const float shift = m_new == -INFINITY ? 0.0f : m_new;
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < kPack; ++j) acc += exp_from(v[j], shift);
    s = s * exp_from(m, shift) + acc;
    m = m_new;
  }
  for (int64_t i = head + n_packs * kPack + threadIdx.x; i < V; i += blockDim.x) {
    update(m, s, static_cast<float>(x[i]));
  }
  // 2. block merge, then thread 0 writes lse (-inf for an all -inf row, +inf for a row with a +inf, NaN for a row
  // with a NaN)
  block_merge(m, s);
  if (threadIdx.x == 0) {
    lse[row] = m + logf(s);
    z[row] = (t >= 0 && t < V) ? static_cast<float>(x[t]) : NAN;
  }
}

// grad may alias logits (in-place backward): each element is read, then written, by one thread, so
// neither pointer is __restrict__ and loads do not go through the read-only cache.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    logits_backward_kernel(const T* logits, int64_t stride, T* grad, int64_t grad_stride,
                           const int64_t* __restrict__ targets, const float* __restrict__ lse,
                           const float* __restrict__ coef_p, const float* __restrict__ coef_y, int64_t V,
                           int64_t ignore_index) {
  constexpr int kPack = Packed<T>::kSize;
  const int64_t row = blockIdx.x;
  const int64_t t = targets[row];
  const bool ignored = t == ignore_index;
  const float cp = ignored ? 0.0f : coef_p[row];
  const float cy = ignored ? 0.0f : coef_y[row];
  const float l = ignored ? 0.0f : lse[row];
  const bool read = cp != 0.0f;  // no softmax term: write the one-hot alone, without reading logits
  const T* x = logits + row * stride;
  T* g = grad + row * grad_stride;
  // The one-hot term is folded in fp32, before rounding (bf16 `p - 1` would cancel).
  auto grad_at = [&](float xv, int64_t i) {
    const float v = read ? cp * __expf(xv - l) : 0.0f;
    return i == t ? v + cy : v;
  };
  int64_t head = V, n_packs = 0;
  if (reinterpret_cast<uintptr_t>(x) % 16 == reinterpret_cast<uintptr_t>(g) % 16) {
    head = aligned_head(x, V);
    n_packs = (V - head) / kPack;
  }
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) {
    g[i] = static_cast<T>(grad_at(read ? static_cast<float>(x[i]) : 0.0f, i));
  }
  const uint4* xp = reinterpret_cast<const uint4*>(x + head);
  uint4* gp = reinterpret_cast<uint4*>(g + head);
#pragma unroll 2
  for (int64_t i = threadIdx.x; i < n_packs; i += blockDim.x) {
    float v[kPack];
    const uint4 raw = read ? xp[i] : make_uint4(0u, 0u, 0u, 0u);
    Packed<T>::unpack(raw, v);
    const int64_t base = head + i * kPack;
#pragma unroll
    for (int j = 0; j < kPack; ++j) v[j] = grad_at(v[j], base + j);
    gp[i] = Packed<T>::pack(v);
  }
  for (int64_t i = head + n_packs * kPack + threadIdx.x; i < V; i += blockDim.x) {
    g[i] = static_cast<T>(grad_at(read ? static_cast<float>(x[i]) : 0.0f, i));
  }
}

int threads_for(int64_t V, int pack) {
  const int64_t packs = (V + pack - 1) / pack;
  int threads = 32;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * kPacksPerThread < packs) threads *= 2;
  return threads;
}

template <typename T>
void launch_forward(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                    const at::Tensor& lse, const at::Tensor& z) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const int threads = threads_for(V, Packed<T>::kSize);
  logits_forward_kernel<T><<<static_cast<unsigned int>(N), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      logits.const_data_ptr<T>(), logits.stride(0), targets.const_data_ptr<int64_t>(), V, ignore_index,
      lse.mutable_data_ptr<float>(), z.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_backward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                     const at::Tensor& coef_p, const at::Tensor& coef_y, int64_t ignore_index,
                     const at::Tensor& grad) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const int threads = threads_for(V, Packed<T>::kSize);
  logits_backward_kernel<T><<<static_cast<unsigned int>(N), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const T*>(logits.const_data_ptr()), logits.stride(0), static_cast<T*>(grad.mutable_data_ptr()),
      grad.stride(0), targets.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(),
      coef_p.const_data_ptr<float>(), coef_y.const_data_ptr<float>(), V, ignore_index);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_grid(const at::Tensor& logits) {
  TORCH_CHECK(logits.size(0) <= 2147483647LL, "logits has more rows than one CUDA grid holds (2^31 - 1)");
}

}  // namespace

void logits_forward_cuda(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                         const at::Tensor& lse, const at::Tensor& target_logit) {
  check_grid(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  switch (logits.scalar_type()) {
    case at::kFloat:
      return launch_forward<float>(logits, targets, ignore_index, lse, target_logit);
    case at::kBFloat16:
      return launch_forward<c10::BFloat16>(logits, targets, ignore_index, lse, target_logit);
    case at::kHalf:
      return launch_forward<c10::Half>(logits, targets, ignore_index, lse, target_logit);
    default:
      TORCH_CHECK(false, "logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  }
}

void logits_backward_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                          const at::Tensor& coef_p, const at::Tensor& coef_y, int64_t ignore_index,
                          const at::Tensor& grad) {
  check_grid(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  switch (logits.scalar_type()) {
    case at::kFloat:
      return launch_backward<float>(logits, targets, lse, coef_p, coef_y, ignore_index, grad);
    case at::kBFloat16:
      return launch_backward<c10::BFloat16>(logits, targets, lse, coef_p, coef_y, ignore_index, grad);
    case at::kHalf:
      return launch_backward<c10::Half>(logits, targets, lse, coef_p, coef_y, ignore_index, grad);
    default:
      TORCH_CHECK(false, "logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  }
}

}  // namespace tpo_fast
