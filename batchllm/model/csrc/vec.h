// fp32 vectors over bf16 storage, one type per instruction set with the same operations, so the element-wise
// kernels (fused_ops.cpp) and the fp32-arithmetic gemm (gemm.cpp) are written once and compiled for each kernel
// path: V16 (AVX-512F/BW: 16 lanes) and V8 (AVX2 + FMA: 8 lanes). Roundings to bf16 are round-to-nearest-even, as
// torch rounds: one instruction with AVX512-BF16, integer arithmetic without it (NaN -> 0x7FC0, as c10::BFloat16).
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define BATCHLLM_HAS_V16 1
#if defined(__AVX512BF16__)
#define BATCHLLM_HAS_BF16_KERNEL 1  // the vdpbf16ps kernels: gemm.cpp's and ragged_attention.cpp's bf16k
#endif
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define BATCHLLM_HAS_V8 1
#endif

namespace vec {

using bf16 = at::BFloat16;

// 2^x = 2^n * 2^f, n = round(x), with a polynomial for 2^f, f in [-0.5, 0.5], of degree 6 (relative error ~1e-7)
// or 5 (~3e-6, ample where the result is rounded to bf16); `times_2n` applies 2^n.
template <class V, int DEGREE = 6>
inline V exp2(V x) {
  static_assert(DEGREE == 5 || DEGREE == 6, "degree 5 or 6");
  const V n = x.round();
  const V f = x - n;
  V p = V::set1(1.3333558e-3f);
  if (DEGREE == 6) p = V::fma(V::set1(1.5403530e-4f), f, p);
  p = V::fma(p, f, V::set1(9.6181291e-3f));
  p = V::fma(p, f, V::set1(5.5504109e-2f));
  p = V::fma(p, f, V::set1(2.4022651e-1f));
  p = V::fma(p, f, V::set1(6.9314718e-1f));
  p = V::fma(p, f, V::set1(1.f));
  return p.times_2n(n);
}

// exp(x) (relative error ~1e-7). Inputs below -100 give ~0, above ~88.7 give +inf.
template <class V>
inline V exp(V x) {
  return exp2<V, 6>(V::max(x, V::set1(-100.f)) * V::set1(1.44269504f));
}

// SiLU in fp32, as torch's F.silu: x / (1 + exp(-x)). Below x = -88 exp(-x) would overflow (1 + inf, then NaN under
// -ffast-math): those lanes give 0, as torch's x / inf gives -0.
template <class V>
inline V silu(V x) {
  const V e = exp(V::min(V::zero() - x, V::set1(88.f)));
  const V s = x / (V::set1(1.f) + e);
  return V::select(V::less(x, V::set1(-88.f)), V::zero(), s);
}

// SiLU of bf16 values, rounded to bf16 as torch's F.silu on a bf16 tensor.
template <class V>
inline V silu_bf16(V x) {
  return silu(x).round_bf16();
}

#ifdef BATCHLLM_HAS_V16
struct V16 {
  static constexpr int N = 16;
  using Mask = __mmask16;
  __m512 v;
  V16() = default;
  V16(__m512 x) : v(x) {}
  static V16 zero() { return _mm512_setzero_ps(); }
  static V16 set1(float x) { return _mm512_set1_ps(x); }
  static __mmask16 tail(int64_t n) { return n >= N ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1u); }
  static V16 load(const float* p, int64_t n = N) {
    return n >= N ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(tail(n), p);
  }
  void store(float* p, int64_t n = N) const {
    if (n >= N) _mm512_storeu_ps(p, v);
    else _mm512_mask_storeu_ps(p, tail(n), v);
  }
  static V16 from_raw(__m256i raw) {  // 16 bf16 bit patterns -> fp32 (exact: a bf16 is the top half of an fp32)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  static V16 load_bf16(const bf16* p, int64_t n = N) {
    return from_raw(n >= N ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                           : _mm256_maskz_loadu_epi16(tail(n), p));
  }
  // 32 bf16 from p -> the even-indexed ones (p[0], p[2], ..) and the odd-indexed ones: a pair read as one 32-bit
  // lane holds the odd one in its top half (an fp32 once the bottom half is cleared), the even one in its bottom half
  static void load_bf16_pairs(const bf16* p, V16& even, V16& odd) {
    const __m512i raw = _mm512_loadu_si512(p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  __m256i to_raw() const {  // -> 16 bf16 bit patterns, round to nearest even
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                  _mm512_set1_epi32(0x7F800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
#endif
  }
  void store_bf16(bf16* p, int64_t n = N) const {
    const __m256i raw = to_raw();
    if (n >= N) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), raw);
    else _mm256_mask_storeu_epi16(p, tail(n), raw);
  }
  V16 round_bf16() const {  // fp32 -> nearest bf16 -> fp32
#if defined(__AVX512BF16__)
    return from_raw(to_raw());
#else  // to_raw's rounding, kept in the top half of each lane (no narrowing and widening back)
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))),
                                       _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                  _mm512_set1_epi32(0x7F800000));
    return _mm512_castsi512_ps(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC00000)));
#endif
  }
  V16 round() const { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  V16 times_2n(V16 n) const { return _mm512_scalef_ps(v, n.v); }
  friend V16 operator+(V16 a, V16 b) { return _mm512_add_ps(a.v, b.v); }
  friend V16 operator-(V16 a, V16 b) { return _mm512_sub_ps(a.v, b.v); }
  friend V16 operator*(V16 a, V16 b) { return _mm512_mul_ps(a.v, b.v); }
  friend V16 operator/(V16 a, V16 b) { return _mm512_div_ps(a.v, b.v); }
  static V16 fma(V16 a, V16 b, V16 c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }  // a * b + c
  static V16 fnma(V16 a, V16 b, V16 c) { return _mm512_fnmadd_ps(a.v, b.v, c.v); }  // c - a * b
  static V16 max(V16 a, V16 b) { return _mm512_max_ps(a.v, b.v); }
  static V16 min(V16 a, V16 b) { return _mm512_min_ps(a.v, b.v); }
  static Mask less(V16 a, V16 b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ); }
  static Mask visible(V16 kp, V16 qp, V16 lo) {  // lo <= kp <= qp
    return _mm512_cmp_ps_mask(kp.v, qp.v, _CMP_LE_OQ) & _mm512_cmp_ps_mask(lo.v, kp.v, _CMP_LE_OQ);
  }
  static V16 select(Mask m, V16 yes, V16 no) { return _mm512_mask_mov_ps(no.v, m, yes.v); }
  static bool any(Mask m) { return m != 0; }
  float sum() const { return _mm512_reduce_add_ps(v); }
  static __m128 sum4(V16 a, V16 b, V16 c, V16 d) {  // the lane sums of a, b, c and d
    auto half = [](V16 x) { return _mm256_add_ps(_mm512_castps512_ps256(x.v), _mm512_extractf32x8_ps(x.v, 1)); };
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(half(a), half(b)), _mm256_hadd_ps(half(c), half(d)));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  }
  float max() const { return _mm512_reduce_max_ps(v); }
};
#endif

#ifdef BATCHLLM_HAS_V8
struct V8 {
  static constexpr int N = 8;
  using Mask = __m256;
  __m256 v;
  V8() = default;
  V8(__m256 x) : v(x) {}
  static V8 zero() { return _mm256_setzero_ps(); }
  static V8 set1(float x) { return _mm256_set1_ps(x); }
  static __m256i tail(int64_t n) {  // lanes < n all ones
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V8 load(const float* p, int64_t n = N) { return n >= N ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail(n)); }
  void store(float* p, int64_t n = N) const {
    if (n >= N) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, tail(n), v);
  }
  static V8 from_raw(__m128i raw) {  // 8 bf16 bit patterns -> fp32
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  static V8 load_bf16(const bf16* p, int64_t n = N) {
    if (n >= N) return from_raw(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    uint16_t tmp[N] = {0};
    std::memcpy(tmp, p, static_cast<size_t>(n) * 2);
    return from_raw(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tmp)));
  }
  static void load_bf16_pairs(const bf16* p, V8& even, V8& odd) {  // as V16's, 16 bf16
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    odd = _mm256_and_ps(_mm256_castsi256_ps(raw), _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  __m128i to_raw() const {  // -> 8 bf16 bit patterns, round to nearest even, NaN -> 0x7FC0
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                           _mm256_set1_epi32(0x7F800000));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit lane: [a0..a3 a0..a3 | a4..a7 a4..a7]
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));  // [a0..a3 a4..a7]
  }
  void store_bf16(bf16* p, int64_t n = N) const {
    const __m128i raw = to_raw();
    if (n >= N) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), raw);
    } else {
      uint16_t tmp[N];
      _mm_storeu_si128(reinterpret_cast<__m128i*>(tmp), raw);
      std::memcpy(p, tmp, static_cast<size_t>(n) * 2);
    }
  }
  V8 round_bf16() const {  // fp32 -> nearest bf16 -> fp32: to_raw's rounding, kept in the top half of each lane
    // (from_raw(to_raw()) narrowed and widened back across the 128-bit lanes: rms_norm ran 0.90x and silu_mul 0.85x)
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))),
                                       _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                           _mm256_set1_epi32(0x7F800000));
    return _mm256_castsi256_ps(_mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), nan));
  }
  V8 round() const { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  V8 times_2n(V8 n) const {  // v * 2^n for integral n; n below -126 gives 0 (no subnormals), above 127 +inf
    const __m256 c = _mm256_max_ps(_mm256_min_ps(n.v, _mm256_set1_ps(128.f)), _mm256_set1_ps(-127.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(c), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(v, _mm256_castsi256_ps(e));
  }
  friend V8 operator+(V8 a, V8 b) { return _mm256_add_ps(a.v, b.v); }
  friend V8 operator-(V8 a, V8 b) { return _mm256_sub_ps(a.v, b.v); }
  friend V8 operator*(V8 a, V8 b) { return _mm256_mul_ps(a.v, b.v); }
  friend V8 operator/(V8 a, V8 b) { return _mm256_div_ps(a.v, b.v); }
  static V8 fma(V8 a, V8 b, V8 c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
  static V8 fnma(V8 a, V8 b, V8 c) { return _mm256_fnmadd_ps(a.v, b.v, c.v); }
  static V8 max(V8 a, V8 b) { return _mm256_max_ps(a.v, b.v); }
  static V8 min(V8 a, V8 b) { return _mm256_min_ps(a.v, b.v); }
  static Mask less(V8 a, V8 b) { return _mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ); }
  static Mask visible(V8 kp, V8 qp, V8 lo) {  // lo <= kp <= qp
    return _mm256_and_ps(_mm256_cmp_ps(kp.v, qp.v, _CMP_LE_OQ), _mm256_cmp_ps(lo.v, kp.v, _CMP_LE_OQ));
  }
  static V8 select(Mask m, V8 yes, V8 no) { return _mm256_blendv_ps(no.v, yes.v, m); }
  static bool any(Mask m) { return _mm256_movemask_ps(m) != 0; }
  static __m128 sum4(V8 a, V8 b, V8 c, V8 d) {  // the lane sums of a, b, c and d
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a.v, b.v), _mm256_hadd_ps(c.v, d.v));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  }
  float sum() const {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
  float max() const {
    const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
  }
};
#endif

// The widest vector of this build.
#if defined(BATCHLLM_HAS_V16)
using Best = V16;
#define BATCHLLM_HAS_VEC 1
#elif defined(BATCHLLM_HAS_V8)
using Best = V8;
#define BATCHLLM_HAS_VEC 1
#endif

}  // namespace vec
