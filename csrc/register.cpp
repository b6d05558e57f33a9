// Schemas of the structprune ops (torch.ops.structprune.*) and device-independent helper ops.
// Kernels: cpu/ops_cpu.cpp (CPU), cuda/ops_cuda.cpp (CUDA, built only with a CUDA torch).
// Fake (meta) kernels and autograd formulas are registered from Python in structprune/_extension.py.
#ifdef STRUCTPRUNE_PYTHON_MODULE
#include <Python.h>  // only for the module init of the setup.py build (structprune._C)
#endif

#include <torch/library.h>

#include <string>
#include <vector>

#include "gated_core.h"
#include "philox.h"

namespace {

std::string build_info() {
  std::string s = "structprune._C ops; cuda=";
#ifdef STRUCTPRUNE_WITH_CUDA
  s += "1";
#else
  s += "0";
#endif
#if defined(__clang__)
  s += "; compiler=clang " __clang_version__;
#elif defined(__GNUC__)
  s += "; compiler=gcc " __VERSION__;
#endif
  return s;
}

std::vector<int64_t> philox4x32_10_op(std::vector<int64_t> counter, std::vector<int64_t> key) {
  TORCH_CHECK(counter.size() == 4 && key.size() == 2, "structprune: philox4x32_10 needs 4 counter and 2 key words");
  structprune::Philox4 c;
  for (int i = 0; i < 4; ++i) c.v[i] = static_cast<uint32_t>(counter[i]);
  const auto r = structprune::philox4x32_10(c, static_cast<uint32_t>(key[0]), static_cast<uint32_t>(key[1]));
  return {r.v[0], r.v[1], r.v[2], r.v[3]};
}

// The dropout multipliers (0 or 1 / (1 - p)) [B, A, S, S] fp32 that cpp_gated_attention applies (see gated_core.h),
// on the device of `heads`: the oracle for the tests.
at::Tensor attention_dropout_scale_op(int64_t batch, int64_t num_heads, int64_t seq, const at::Tensor& heads,
                                      double p, int64_t seed, int64_t offset) {
  return structprune::attention_dropout_scale(batch, num_heads, seq, heads, {p, seed, offset}, heads.device());
}

}  // namespace

// Forward ops return (y, saved tensors...): with save_for_backward=True what the backward op takes so that it
// recomputes nothing (attention: qkv [B*S, 3*A*D], ctx [B*S, A*D], lse [B, S, A] fp32; FFN: pre, h [B*S, K]; GLU
// FFN: pre [B*S, 2K], h [B*S, K]; the GLU ops take optional biases and run on the CPU only so far),
// otherwise empty [0] tensors. The backward ops recompute the forward when the saved tensors are not passed.
// Backward ops: output_mask = (grad of x, grads of every weight and bias, grad of the gates), as aten's
// convolution_backward; the work serving only masked-out gradients is skipped and those outputs are empty [0]
// tensors (dtype and device of the matching input). The default computes everything.
TORCH_LIBRARY(structprune, m) {
  m.def(
      "cpp_gated_attention(Tensor x, Tensor wq, Tensor bq, Tensor wk, Tensor bk, Tensor wv, Tensor bv, Tensor wo, "
      "Tensor bo, Tensor head_gates, Tensor active_heads, Tensor? key_bias, int num_heads, "
      "bool save_for_backward=False, float dropout_p=0.0, int seed=0, int offset=0) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpp_gated_attention_backward(Tensor grad_out, Tensor x, Tensor wq, Tensor bq, Tensor wk, Tensor bk, "
      "Tensor wv, Tensor bv, Tensor wo, Tensor bo, Tensor head_gates, Tensor active_heads, Tensor? key_bias, "
      "int num_heads, Tensor? qkv=None, Tensor? ctx=None, Tensor? lse=None, "
      "bool[3] output_mask=[True, True, True], float dropout_p=0.0, int seed=0, int offset=0) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpp_gated_ffn(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor unit_gates, Tensor kept_units, "
      "str activation, bool save_for_backward=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cpp_gated_ffn_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
      "Tensor unit_gates, Tensor kept_units, str activation, Tensor? pre=None, Tensor? h=None, "
      "bool[3] output_mask=[True, True, True]) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpp_gated_glu_ffn(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor unit_gates, "
      "Tensor kept_units, str activation, bool save_for_backward=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cpp_gated_glu_ffn_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, "
      "Tensor unit_gates, Tensor kept_units, str activation, Tensor? pre=None, Tensor? h=None, "
      "bool[3] output_mask=[True, True, True]) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Sliding-window attention for inference (cpu/modernbert_cpu.cpp): q, k, v [B, A, S, D] -> [B, S, A, D].
  m.def("cpp_banded_attention(Tensor q, Tensor k, Tensor v, Tensor? key_bias, int window, float scale, int block) -> "
        "Tensor");
  // Exact softmax attention for fp32 inference with a small head_dim (cpu/serving_attention_cpu.cpp, the serving
  // module's): q [B, H, Sq, D], k, v [B, H, Sk, D] -> [B, Sq, H, D]; forward only.
  m.def("cpp_serving_attention(Tensor q, Tensor k, Tensor v, Tensor? key_bias, float scale) -> Tensor");
  // Rotary positions on q and k of the fused projection [B, S, P, A, D] -> [B, S, 2, A, D] (the same file).
  m.def("cpp_rotary_qk(Tensor qkv, Tensor cos, Tensor sin) -> Tensor");
  m.def("cpp_hard_concrete_sample(Tensor log_alpha, int seed, int offset, float beta, Tensor? mask=None) -> Tensor");
  m.def(
      "cpp_hard_concrete_sample_backward(Tensor grad, Tensor log_alpha, int seed, int offset, float beta, "
      "Tensor? mask=None) -> Tensor");
  // A decoder's attention of a few queries (decode steps) against a KV cache through the head -> KV-head map
  // (cpu/decoder_cpu.cpp); forward only.
  m.def(
      "cpp_decoder_decode_attention(Tensor q, Tensor k, Tensor v, Tensor q_to_kv, Tensor? key_mask, int window, "
      "float scale) -> Tensor");
  // The q/k/v GEMM's epilogue: Qwen3's q/k RMSNorm, rotary positions, [B, H, S, D] layout; forward only.
  m.def(
      "cpp_decoder_rotary(Tensor qkv, Tensor cos, Tensor sin, Tensor? q_norm, Tensor? k_norm, float eps, "
      "int head_dim, int num_q, int num_kv) -> (Tensor, Tensor, Tensor)");
  // Row norms for inference (cpu/norm_cpu.cpp): HF's RMSNorm, and LayerNorm with fp32 weight and bias (the serving
  // module's); forward only.
  m.def("cpp_rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("cpp_layer_norm(Tensor x, Tensor weight, Tensor bias, float eps) -> Tensor");
  // A BERT-layout embedding block for inference (the same file): the three lookups, their sum and the LayerNorm.
  m.def("cpp_embedding_layer_norm(Tensor ids, Tensor? type_ids, Tensor position_ids, Tensor word, Tensor? types, "
        "Tensor positions, Tensor weight, Tensor bias, float eps, bool bf16_out) -> Tensor");
  m.def("attention_dropout_scale(int batch, int num_heads, int seq, Tensor heads, float p, int seed, int offset) -> "
        "Tensor", &attention_dropout_scale_op);
  m.def("pack_cache_clear() -> ()", &structprune::pack_cache_clear);
  m.def("pack_cache_size() -> int", &structprune::pack_cache_size);
  m.def("build_info() -> str", &build_info);
  m.def("activation_names() -> str[]", &structprune::activation_names);
  m.def("philox4x32_10(int[] counter, int[] key) -> int[]", &philox4x32_10_op);
}

#ifdef STRUCTPRUNE_PYTHON_MODULE
// `import structprune._C` loads this library, whose static initializers register the ops above.
static struct PyModuleDef structprune_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                                  "structprune compiled ops, registered in torch.ops.structprune",
                                                  -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&structprune_c_module); }
#endif
