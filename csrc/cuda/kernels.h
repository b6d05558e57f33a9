// Launchers of the structprune CUDA kernels (cuda/kernels.cu). Raw pointers and a stream in, a cudaError_t out;
// no torch types, so kernels.cu compiles with nvcc alone. Called from cuda/ops_cuda.cpp.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

namespace structprune {
namespace cuda {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };
enum class ActKind : int { Gelu = 0, GeluTanh = 1, Relu = 2, Silu = 3 };

// a [rows, cols] row-major: a <- act(a + bias[c]) * col_scale[c] (bias and col_scale may be null). With h_out non-null:
// a <- a + bias (pre-activation) and h_out <- act(a + bias) (ungated).
cudaError_t bias_act(void* a, const void* bias, const void* col_scale, void* h_out, int64_t rows, int64_t cols,
                     DType dtype, ActKind act, cudaStream_t stream);

// dh [rows, cols] <- dh * act'(pre)
cudaError_t act_backward(void* dh, const void* pre, int64_t rows, int64_t cols, DType dtype, ActKind act,
                         cudaStream_t stream);

// t [rows, cols] <- t * col_scale[c]
cudaError_t scale_cols(void* t, const void* col_scale, int64_t rows, int64_t cols, DType dtype, cudaStream_t stream);

// Hard-concrete gates with Philox4x32-10 noise (see philox.h), fp32. grad == null: out = z * mask;
// else out = grad * dz/dlog_alpha * mask. mask may be null.
cudaError_t hard_concrete(const float* log_alpha, const float* mask, const float* grad, float* out, int64_t n,
                          uint64_t seed, uint64_t offset, float beta, cudaStream_t stream);

}  // namespace cuda
}  // namespace structprune
