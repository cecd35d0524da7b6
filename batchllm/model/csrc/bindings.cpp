// Python bindings of the CPU kernels (one extension module, compiled on first use by batchllm.model.cpu_kernels).
#include <torch/extension.h>

#include <optional>
#include <vector>

std::vector<at::Tensor> ragged_attention(at::Tensor q, at::Tensor kv, at::Tensor q_ptr, at::Tensor q_rows,
                                         at::Tensor kv_ptr, at::Tensor kv_slots, at::Tensor kv_start,
                                         at::Tensor q_pos, int64_t window, double scale);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor add_rms_norm(at::Tensor& x, const at::Tensor& delta, const at::Tensor& w, double eps);
at::Tensor silu_mul(const at::Tensor& gu);
void rope_write_kv(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                   const at::Tensor& positions, at::Tensor& kv, const at::Tensor& slots);
at::Tensor merge(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& index, bool fp32);
at::Tensor argmax_rows(const at::Tensor& x);
void apply_token_bitmask(at::Tensor& x, const at::Tensor& rows, const at::Tensor& mask);
bool bf16_kernels();
double peak_flops(int64_t iters);
at::Tensor gemm_pack_weight(const at::Tensor& w, bool gated);
at::Tensor gemm(const at::Tensor& x, const at::Tensor& packed, int64_t n, const std::optional<at::Tensor>& bias,
                bool gated, const std::optional<at::Tensor>& next);
at::Tensor gemm_pack_weight_f32(const at::Tensor& w, bool gated);
at::Tensor gemm_f32(const at::Tensor& x, const at::Tensor& packed, int64_t n, const std::optional<at::Tensor>& bias,
                    bool gated, const std::optional<at::Tensor>& next);

// The kernel path of this build, from the compiler's target macros (batchllm.machine.ISA_CFLAGS sets them).
const char* isa() {
#if defined(__AVX512BF16__)
  return "avx512bf16";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "portable";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ragged_attention", &ragged_attention, "paged attention over ragged parts (CPU), returns (out fp32, lse)");
  m.def("rms_norm", &rms_norm, "RMSNorm of bf16 or fp32 rows (HF order of roundings)");
  m.def("add_rms_norm", &add_rms_norm, "x += delta in place, then RMSNorm of x (bf16 or fp32)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused [T, 2I] projection (bf16 or fp32)");
  m.def("rope_write_kv", &rope_write_kv,
        "rotary embedding of q, k in place and K/V written to cache slots (bf16 or fp32)");
  m.def("bf16_kernels", &bf16_kernels, "whether this build has the bf16 gemm, attention and fused ops");
  m.def("isa", &isa, "the kernel path this module was built for: portable, avx2, avx512 or avx512bf16");
  m.def("merge", &merge, "log-sum-exp merge of partial attention results into bf16 rows (fp32 rows if fp32)",
        pybind11::arg("out"), pybind11::arg("lse"), pybind11::arg("index"), pybind11::arg("fp32") = false);
  m.def("gemm_pack_weight", &gemm_pack_weight, "a bf16 weight [N, K] in the layout of gemm (panels of 64 columns)",
        pybind11::arg("w"), pybind11::arg("gated") = false);
  m.def("gemm", &gemm, "x [..., K] times a packed bf16 weight, plus an optional bias: [..., n] bf16 (gated: [..., n/2])",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("n"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("gated") = false, pybind11::arg("next") = pybind11::none());
  m.def("gemm_pack_weight_f32", &gemm_pack_weight_f32,
        "an fp32 weight [N, K] in the layout of gemm_f32 (panels of 64 columns, [P, K, 64])", pybind11::arg("w"),
        pybind11::arg("gated") = false);
  m.def("gemm_f32", &gemm_f32,
        "x [..., K] fp32 times a packed fp32 weight, plus an optional bias: [..., n] fp32 (gated: [..., n/2])",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("n"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("gated") = false, pybind11::arg("next") = pybind11::none());
  m.def("peak_flops", &peak_flops, "FLOP/s of the gemm tile's instruction in 12 independent chains on every thread",
        pybind11::arg("iters") = 2000000);
  m.def("argmax_rows", &argmax_rows, "per row the index of the largest bf16 value (as torch.argmax in fp32)");
  m.def("apply_token_bitmask", &apply_token_bitmask, "-inf in x[rows[i]] wherever bit t of mask[i] is 0 (in place)");
}
