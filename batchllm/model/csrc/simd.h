// AVX-512 helpers shared by the CPU kernels (only compiled where the CPU has AVX512-BF16).
#pragma once

#if defined(__AVX512BF16__)
#define BATCHLLM_HAS_BF16_KERNEL 1
#include <immintrin.h>

#include <ATen/ATen.h>

namespace simd {

// 16 bf16 -> 16 fp32 (exact: a bf16 is the top half of an fp32). `n` < 16 loads a masked tail (zeros past it).
inline __m512 load_bf16(const at::BFloat16* p, int64_t n = 16) {
  const __m256i raw = n >= 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                              : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1u), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// 16 fp32 -> 16 bf16, round to nearest even (as torch rounds); `n` < 16 stores a masked tail.
inline void store_bf16(at::BFloat16* p, __m512 v, int64_t n = 16) {
  const __m256i packed = (__m256i)_mm512_cvtneps_pbh(v);
  if (n >= 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
  } else {
    _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1u), packed);
  }
}

// fp32 -> nearest bf16 -> fp32 (a bf16 rounding step inside an fp32 computation).
inline __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// 2^x in fp32 lanes: 2^n * 2^f, n = round(x), with a polynomial for 2^f, f in [-0.5, 0.5], of degree 6 (relative
// error ~1e-7) or 5 (~3e-6, ample where the result is rounded to bf16). x <= -1e20 gives 0, x above ~128 gives +inf.
template <int DEGREE = 6>
inline __m512 exp2_512(__m512 x) {
  static_assert(DEGREE == 5 || DEGREE == 6, "degree 5 or 6");
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.3333558e-3f);
  if (DEGREE == 6) p = _mm512_fmadd_ps(_mm512_set1_ps(1.5403530e-4f), f, p);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// exp(x) in fp32 lanes (relative error ~1e-7). Inputs below -100 give ~0 (exp(-100) ~ 4e-44), above ~88.7 give +inf.
inline __m512 exp512(__m512 x) {
  return exp2_512<6>(_mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-100.f)), _mm512_set1_ps(1.44269504f)));
}

// SiLU of bf16 values, rounded to bf16 as torch's F.silu on a bf16 tensor: x / (1 + exp(-x)). Below x = -88 exp(-x)
// would overflow (1 + inf, then NaN under -ffast-math): those lanes give 0, as torch's x / inf gives -0 (one bf16
// step of ~1e-37 differs for x in [-88.7, -88)). `silu_mul` and the gated gemm's epilogue both use it and give the
// same bits (`test_layers.py` checks it: -ffast-math could contract it differently at two call sites).
inline __m512 silu_bf16(__m512 x) {
  const __m512 e = exp512(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), x), _mm512_set1_ps(88.f)));
  const __m512 s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e));
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-88.f), _CMP_LT_OQ);
  return round_bf16(_mm512_mask_mov_ps(s, tiny, _mm512_setzero_ps()));
}

}  // namespace simd
#endif
