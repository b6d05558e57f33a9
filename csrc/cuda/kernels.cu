// structprune CUDA kernels: bias + activation (+ gate) epilogue and its backward, column gate scaling, and the
// fused Philox hard-concrete sampler. Only CUDA headers: compiles with nvcc alone
// (csrc/check_cuda_compile.sh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "../philox.h"
#include "kernels.h"

namespace structprune {
namespace cuda {
namespace {

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

constexpr float kSqrt1_2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kTanhBeta = 0.79788456080286535588f;
constexpr float kTanhKappa = 0.044715f;

__device__ __forceinline__ float act_fwd(float x, int act) {
  if (act == static_cast<int>(ActKind::Gelu)) return 0.5f * x * (1.0f + erff(x * kSqrt1_2));
  if (act == static_cast<int>(ActKind::GeluTanh))
    return 0.5f * x * (1.0f + tanhf(kTanhBeta * (x + kTanhKappa * x * x * x)));
  if (act == static_cast<int>(ActKind::Silu)) return x / (1.0f + expf(-x));
  return x > 0.0f ? x : 0.0f;
}

__device__ __forceinline__ float act_grad(float x, int act) {
  if (act == static_cast<int>(ActKind::Gelu)) {
    const float cdf = 0.5f * (1.0f + erff(x * kSqrt1_2));
    return cdf + x * expf(-0.5f * x * x) * kInvSqrt2Pi;
  }
  if (act == static_cast<int>(ActKind::GeluTanh)) {
    const float x2 = x * x;
    const float t = tanhf(kTanhBeta * (x + kTanhKappa * x2 * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kTanhBeta * (1.0f + 3.0f * kTanhKappa * x2);
  }
  if (act == static_cast<int>(ActKind::Silu)) {  // as ATen's silu_backward: s * (1 + x * (1 - s))
    const float sg = 1.0f / (1.0f + expf(-x));
    return sg * (1.0f + x * (1.0f - sg));
  }
  return x > 0.0f ? 1.0f : 0.0f;
}

// Grid-stride loops over rows * cols elements; the column of element i is i % cols.
template <typename T>
__global__ void bias_act_kernel(T* __restrict__ a, const T* __restrict__ bias, const T* __restrict__ scale,
                                T* __restrict__ h, int64_t total, int64_t cols, int act) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % cols;
    const float pre = bias != nullptr ? to_f(a[i]) + to_f(bias[c]) : to_f(a[i]);
    float y = act_fwd(pre, act);
    if (h != nullptr) {
      a[i] = from_f<T>(pre);
      h[i] = from_f<T>(y);
    } else {
      if (scale != nullptr) y *= to_f(scale[c]);
      a[i] = from_f<T>(y);
    }
  }
}

template <typename T>
__global__ void act_backward_kernel(T* __restrict__ dh, const T* __restrict__ pre, int64_t total, int act) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dh[i] = from_f<T>(to_f(dh[i]) * act_grad(to_f(pre[i]), act));
  }
}

template <typename T>
__global__ void scale_cols_kernel(T* __restrict__ t, const T* __restrict__ scale, int64_t total, int64_t cols) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    t[i] = from_f<T>(to_f(t[i]) * to_f(scale[i % cols]));
  }
}

__global__ void hard_concrete_kernel(const float* __restrict__ log_alpha, const float* __restrict__ mask,
                                     const float* __restrict__ grad, float* __restrict__ out, int64_t n,
                                     uint64_t seed, uint64_t offset, float beta) {
  const int64_t blk = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;  // 4 elements per thread
  if (blk * 4 >= n) return;
  const Philox4 r = philox_block(seed, offset, static_cast<uint64_t>(blk));
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t i = blk * 4 + j;
    if (i < n) {
      float dz;
      const float z = hard_concrete_value(clamp_uniform(philox_to_uniform(r.v[j])), log_alpha[i], beta, &dz);
      const float m = mask != nullptr ? mask[i] : 1.0f;
      out[i] = grad != nullptr ? grad[i] * dz * m : z * m;
    }
  }
}

constexpr int kThreads = 256;

unsigned int blocks_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);
}

template <template <typename> class Launch, typename... Args>
cudaError_t dispatch(DType dtype, Args... args) {
  switch (dtype) {
    case DType::F32:
      Launch<float>::run(args...);
      break;
    case DType::BF16:
      Launch<__nv_bfloat16>::run(args...);
      break;
    case DType::F16:
      Launch<__half>::run(args...);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T>
struct BiasActLaunch {
  static void run(void* a, const void* bias, const void* scale, void* h, int64_t rows, int64_t cols, int act,
                  cudaStream_t s) {
    const int64_t total = rows * cols;
    bias_act_kernel<T><<<blocks_for(total), kThreads, 0, s>>>(static_cast<T*>(a), static_cast<const T*>(bias),
                                                              static_cast<const T*>(scale), static_cast<T*>(h),
                                                              total, cols, act);
  }
};

template <typename T>
struct ActBackwardLaunch {
  static void run(void* dh, const void* pre, int64_t total, int act, cudaStream_t s) {
    act_backward_kernel<T><<<blocks_for(total), kThreads, 0, s>>>(static_cast<T*>(dh), static_cast<const T*>(pre),
                                                                  total, act);
  }
};

template <typename T>
struct ScaleColsLaunch {
  static void run(void* t, const void* scale, int64_t total, int64_t cols, cudaStream_t s) {
    scale_cols_kernel<T><<<blocks_for(total), kThreads, 0, s>>>(static_cast<T*>(t), static_cast<const T*>(scale),
                                                                total, cols);
  }
};

}  // namespace

cudaError_t bias_act(void* a, const void* bias, const void* col_scale, void* h_out, int64_t rows, int64_t cols,
                     DType dtype, ActKind act, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  return dispatch<BiasActLaunch>(dtype, a, bias, col_scale, h_out, rows, cols, static_cast<int>(act), stream);
}

cudaError_t act_backward(void* dh, const void* pre, int64_t rows, int64_t cols, DType dtype, ActKind act,
                         cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  return dispatch<ActBackwardLaunch>(dtype, dh, pre, rows * cols, static_cast<int>(act), stream);
}

cudaError_t scale_cols(void* t, const void* col_scale, int64_t rows, int64_t cols, DType dtype, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  return dispatch<ScaleColsLaunch>(dtype, t, col_scale, rows * cols, cols, stream);
}

cudaError_t hard_concrete(const float* log_alpha, const float* mask, const float* grad, float* out, int64_t n,
                          uint64_t seed, uint64_t offset, float beta, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks4 = (n + 3) / 4;
  const unsigned int grid = static_cast<unsigned int>((blocks4 + kThreads - 1) / kThreads);
  hard_concrete_kernel<<<grid, kThreads, 0, stream>>>(log_alpha, mask, grad, out, n, seed, offset, beta);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace structprune
