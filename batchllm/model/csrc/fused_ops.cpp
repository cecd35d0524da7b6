// Fused element-wise ops of the decoder layer for CPU, over bf16 or fp32 tensors (the model's dtype; all tensors of a
// call alike). Each reads and writes its tensors once, computing in fp32; the torch equivalents make one pass (and, in
// bf16, one rounding) per operator. Rows are split over torch's threads. Written once over the vector type of the
// build (vec.h: 16 lanes with AVX-512, 8 with AVX2); the roundings are the same on every path, only sums over a row
// may differ in their last bits. In fp32 the results are torch's to within a few fp32 ulps (sums in another order,
// SiLU's exp, rotary's a * b - c * d as one FMA). Built where the kernel path has vectors (`bf16_kernels()`);
// elsewhere the model uses torch ops.
//
//   rms_norm(x [T, N], w [N], eps) -> [T, N]                  w * round(x * rsqrt(mean(x^2) + eps))  (HF order)
//   add_rms_norm(x [T, N], delta [T, N], w, eps) -> [T, N]    x += delta (in place, rounded), then rms_norm(x)
//   silu_mul(gu [T, 2I]) -> [T, I]                           round(silu(gate)) * up, gate = gu[:, :I], up = gu[:, I:]
//   rope_write_kv(q [T, H, D], k [T, KVH, D], v, cos [P, D], sin [P, D], positions [T], kv [2, S, KVH, D],
//                 slots [T])                                 rotates q and k in place (rotate_half convention, fp32,
//                                                            one rounding) and writes k, v to cache slot slots[t]
//                                                            (skipped if < 0); q, k, v rows may be strided
//   merge(out [N, H, D] fp32, lse [N, H] fp32, index [T, L], fp32=False) -> [T, H, D] bf16 (fp32 if asked)
//                                                            per row: sum_l softmax(lse[index[t, l]]) * out[index[t, l]]
//                                                            (index >= N: no partial result)
//   argmax_rows(x [B, V]) -> [B] int64                       (bf16 only) per row the index of the largest value, the
//                                                            lowest among ties; as torch.argmax of the fp32 values (a
//                                                            NaN beats everything, the first NaN wins; -0 equals +0)
// round(): to bf16 for bf16 tensors (the rounding of the torch op in between), nothing for fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "vec.h"

bool bf16_kernels() {
#ifdef BATCHLLM_HAS_VEC
  return true;
#else
  return false;
#endif
}

#ifdef BATCHLLM_HAS_VEC
namespace {

using bf16 = at::BFloat16;
using V = vec::Best;
constexpr int64_t L = V::N;
constexpr float NEG = -1e30f;  // finite "minus infinity" (built with -ffast-math)

// Loads and stores of one element type as fp32 vectors (n: the lanes in use), and the rounding a torch op of that
// dtype gives its result.
template <typename T>
struct Io;

template <>
struct Io<bf16> {
  static V load(const bf16* p, int64_t n) { return V::load_bf16(p, n); }
  static void store(V v, bf16* p, int64_t n) { v.store_bf16(p, n); }
  static V round(V v) { return v.round_bf16(); }
};

template <>
struct Io<float> {
  static V load(const float* p, int64_t n) { return V::load(p, n); }
  static void store(V v, float* p, int64_t n) { v.store(p, n); }
  static V round(V v) { return v; }
};

// t is a contiguous CPU tensor of the call's dtype (bf16 or fp32; by_dtype refuses any other).
void check(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.device().is_cpu(), name, " must be a contiguous ",
              c10::toString(dtype), " CPU tensor, as the call's other tensors");
}

void check_bf16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous bf16 CPU tensor");
}

// Calls f(T{}) with T the element type of `dtype` (bf16 or fp32).
template <typename F>
void by_dtype(at::ScalarType dtype, const char* op, const F& f) {
  if (dtype == at::kBFloat16) return f(bf16{});
  TORCH_CHECK(dtype == at::kFloat, op, ": bf16 or fp32 tensors only");
  f(0.f);
}

template <typename T>
void norm_row(const T* x, const T* w, T* out, int64_t n, float eps) {
  V ss = V::zero();
  for (int64_t i = 0; i < n; i += L) {
    const V v = Io<T>::load(x + i, n - i);
    ss = V::fma(v, v, ss);
  }
  const V inv = V::set1(1.f / std::sqrt(ss.sum() / static_cast<float>(n) + eps));
  for (int64_t i = 0; i < n; i += L) {
    const V h = Io<T>::round(Io<T>::load(x + i, n - i) * inv);
    Io<T>::store(Io<T>::load(w + i, n - i) * h, out + i, n - i);
  }
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  auto out = at::empty_like(x);
  by_dtype(x.scalar_type(), "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    check(x, "x", x.scalar_type());
    check(w, "w", x.scalar_type());
    const int64_t n = x.size(-1), rows = x.numel() / n;
    const T *px = x.data_ptr<T>(), *pw = w.data_ptr<T>();
    T* po = out.data_ptr<T>();
    at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) norm_row(px + r * n, pw, po + r * n, n, static_cast<float>(eps));
    });
  });
  return out;
}

at::Tensor add_rms_norm(at::Tensor& x, const at::Tensor& delta, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.sizes() == delta.sizes(), "x and delta differ in shape");
  auto out = at::empty_like(x);
  by_dtype(x.scalar_type(), "add_rms_norm", [&](auto tag) {
    using T = decltype(tag);
    check(x, "x", x.scalar_type());
    check(delta, "delta", x.scalar_type());
    check(w, "w", x.scalar_type());
    const int64_t n = x.size(-1), rows = x.numel() / n;
    T* px = x.data_ptr<T>();
    const T *pd = delta.data_ptr<T>(), *pw = w.data_ptr<T>();
    T* po = out.data_ptr<T>();
    at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        T* xr = px + r * n;
        const T* dr = pd + r * n;
        for (int64_t i = 0; i < n; i += L)
          Io<T>::store(Io<T>::load(xr + i, n - i) + Io<T>::load(dr + i, n - i), xr + i, n - i);
        norm_row(xr, pw, po + r * n, n, static_cast<float>(eps));
      }
    });
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gu) {
  const int64_t two_i = gu.size(-1), inter = two_i / 2, rows = gu.numel() / two_i;
  auto out = at::empty({rows, inter}, gu.options());
  by_dtype(gu.scalar_type(), "silu_mul", [&](auto tag) {
    using T = decltype(tag);
    check(gu, "gu", gu.scalar_type());
    const T* pg = gu.data_ptr<T>();
    T* po = out.data_ptr<T>();
    at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const T* g = pg + r * two_i;
        const T* u = g + inter;
        T* o = po + r * inter;
        for (int64_t i = 0; i < inter; i += L)
          Io<T>::store(Io<T>::round(vec::silu(Io<T>::load(g + i, inter - i))) * Io<T>::load(u + i, inter - i), o + i,
                       inter - i);
      }
    });
  });
  return out;
}

void rope_write_kv(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                   const at::Tensor& positions, at::Tensor& kv, const at::Tensor& slots) {
  const at::ScalarType dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "rope_write_kv: bf16 or fp32 tensors only");
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, "q, k, v must have one dtype");
  check(cos, "cos", dtype);
  check(sin, "sin", dtype);
  check(kv, "kv", dtype);
  const int64_t T = q.size(0), H = q.size(1), KVH = k.size(1), D = q.size(2), half = D / 2;
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "q, k, v need a contiguous last dim");
  TORCH_CHECK(D % 2 == 0 && kv.size(2) == KVH && kv.size(3) == D, "cache and head shapes differ");
  const int64_t S = kv.size(1);
  const int64_t* ppos = positions.data_ptr<int64_t>();
  const int64_t* pslot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(pslot[t] < S, "cache slot out of range");
    TORCH_CHECK(ppos[t] >= 0 && ppos[t] < cos.size(0), "position outside the rotary table");
  }
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1);
  by_dtype(dtype, "rope_write_kv", [&](auto tag) {
    using E = decltype(tag);
    E *pq = q.data_ptr<E>(), *pk = k.data_ptr<E>(), *pkv = kv.data_ptr<E>();
    const E* pv = v.data_ptr<E>();
    const E *pc = cos.data_ptr<E>(), *ps = sin.data_ptr<E>();
    at::parallel_for(0, T, 8, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const E* c = pc + ppos[t] * D;
        const E* s = ps + ppos[t] * D;
        auto rotate = [&](E* x) {  // x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
          for (int64_t i = 0; i < half; i += L) {
            const int64_t n = half - i;
            const V x1 = Io<E>::load(x + i, n), x2 = Io<E>::load(x + half + i, n);
            const V o1 = V::fnma(x2, Io<E>::load(s + i, n), x1 * Io<E>::load(c + i, n));
            const V o2 = V::fma(x1, Io<E>::load(s + half + i, n), x2 * Io<E>::load(c + half + i, n));
            Io<E>::store(o1, x + i, n);
            Io<E>::store(o2, x + half + i, n);
          }
        };
        for (int64_t h = 0; h < H; ++h) rotate(pq + t * qs0 + h * qs1);
        for (int64_t h = 0; h < KVH; ++h) rotate(pk + t * ks0 + h * ks1);
        const int64_t slot = pslot[t];
        if (slot < 0) continue;
        for (int64_t h = 0; h < KVH; ++h) {
          std::copy(pk + t * ks0 + h * ks1, pk + t * ks0 + h * ks1 + D, pkv + (slot * KVH + h) * D);
          std::copy(pv + t * vs0 + h * vs1, pv + t * vs0 + h * vs1 + D, pkv + ((S + slot) * KVH + h) * D);
        }
      }
    });
  });
}

at::Tensor merge(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& index, bool fp32) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && lse.scalar_type() == at::kFloat && out.is_contiguous() &&
              lse.is_contiguous() && index.is_contiguous(), "merge takes contiguous fp32 out and lse");
  const int64_t N = out.size(0), H = out.size(1), D = out.size(2), T = index.size(0), Lp = index.size(1);
  auto res = at::empty({T, H, D}, out.options().dtype(fp32 ? at::kFloat : at::kBFloat16));
  by_dtype(res.scalar_type(), "merge", [&](auto tag) {
    using E = decltype(tag);
    const float *po = out.data_ptr<float>(), *pl = lse.data_ptr<float>();
    const int64_t* pi = index.data_ptr<int64_t>();
    E* pr = res.data_ptr<E>();
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      std::vector<float> wts(Lp);
      for (int64_t t = b; t < e; ++t) {
        const int64_t* idx = pi + t * Lp;
        for (int64_t h = 0; h < H; ++h) {
          float mx = NEG;
          for (int64_t l = 0; l < Lp; ++l) mx = std::max(mx, idx[l] < N ? pl[idx[l] * H + h] : NEG);
          float total = 0.f;
          for (int64_t l = 0; l < Lp; ++l) {
            wts[l] = idx[l] < N && pl[idx[l] * H + h] > NEG ? std::exp(pl[idx[l] * H + h] - mx) : 0.f;
            total += wts[l];
          }
          E* dst = pr + (t * H + h) * D;
          for (int64_t d = 0; d < D; d += L) {
            V acc = V::zero();
            for (int64_t l = 0; l < Lp; ++l) {
              if (wts[l] == 0.f) continue;
              acc = V::fma(V::set1(wts[l] / total), V::load(po + (idx[l] * H + h) * D + d, D - d), acc);
            }
            Io<E>::store(acc, dst + d, D - d);
          }
        }
      }
    });
  });
  return res;
}

namespace {

// bf16 bits -> int16 keys ordered as the values: x >= 0 keeps its bits, x < 0 becomes -(bits of |x|), so -0 and +0
// are equal; every NaN gets one key above +inf (0x7F80). Integers, so -ffast-math cannot assume the NaNs away.
// Lane l of chunk c holds element W c + l (W = 32 with AVX-512BW, 16 with AVX2); each lane keeps its largest key and
// the first chunk holding it.
#if defined(BATCHLLM_HAS_V16)
constexpr int64_t W = 32;
inline __m512i order_keys(__m512i bits) {
  const __m512i mag = _mm512_and_si512(bits, _mm512_set1_epi16(0x7FFF));
  const __m512i key = _mm512_mask_sub_epi16(mag, _mm512_movepi16_mask(bits), _mm512_setzero_si512(), mag);
  return _mm512_mask_mov_epi16(key, _mm512_cmpgt_epi16_mask(mag, _mm512_set1_epi16(0x7F80)), _mm512_set1_epi16(0x7F81));
}

void lane_best(const bf16* x, int64_t V_, int16_t* keys, uint16_t* chunks) {
  __m512i best = _mm512_set1_epi16(INT16_MIN), best_chunk = _mm512_setzero_si512(), chunk = _mm512_setzero_si512();
  const __m512i one = _mm512_set1_epi16(1);
  for (int64_t i = 0; i < V_; i += W) {
    __m512i key;
    if (V_ - i >= W) {
      key = order_keys(_mm512_loadu_si512(x + i));
    } else {  // lanes past the row's end keep INT16_MIN, below every real key
      const __mmask32 valid = static_cast<__mmask32>((uint64_t{1} << (V_ - i)) - 1u);
      key = _mm512_mask_mov_epi16(_mm512_set1_epi16(INT16_MIN), valid,
                                  order_keys(_mm512_maskz_loadu_epi16(valid, x + i)));
    }
    const __mmask32 gt = _mm512_cmpgt_epi16_mask(key, best);  // strict: a tie keeps the earlier chunk
    best = _mm512_mask_mov_epi16(best, gt, key);
    best_chunk = _mm512_mask_mov_epi16(best_chunk, gt, chunk);
    chunk = _mm512_add_epi16(chunk, one);
  }
  _mm512_storeu_si512(keys, best);
  _mm512_storeu_si512(chunks, best_chunk);
}
#else
constexpr int64_t W = 16;
inline __m256i order_keys(__m256i bits) {
  const __m256i mag = _mm256_and_si256(bits, _mm256_set1_epi16(0x7FFF));
  const __m256i neg = _mm256_srai_epi16(bits, 15);  // all ones where the sign bit is set
  const __m256i key = _mm256_blendv_epi8(mag, _mm256_sub_epi16(_mm256_setzero_si256(), mag), neg);
  return _mm256_blendv_epi8(key, _mm256_set1_epi16(0x7F81), _mm256_cmpgt_epi16(mag, _mm256_set1_epi16(0x7F80)));
}

void lane_best(const bf16* x, int64_t V_, int16_t* keys, uint16_t* chunks) {
  __m256i best = _mm256_set1_epi16(INT16_MIN), best_chunk = _mm256_setzero_si256(), chunk = _mm256_setzero_si256();
  const __m256i one = _mm256_set1_epi16(1);
  for (int64_t i = 0; i < V_; i += W) {
    __m256i key;
    if (V_ - i >= W) {
      key = order_keys(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)));
    } else {  // lanes past the row's end keep INT16_MIN, below every real key
      int16_t tmp[W];
      std::fill(tmp, tmp + W, int16_t{0});
      std::memcpy(tmp, x + i, static_cast<size_t>(V_ - i) * 2);
      key = order_keys(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tmp)));
      const __m256i lane = _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m256i valid = _mm256_cmpgt_epi16(_mm256_set1_epi16(static_cast<int16_t>(V_ - i)), lane);
      key = _mm256_blendv_epi8(_mm256_set1_epi16(INT16_MIN), key, valid);
    }
    const __m256i gt = _mm256_cmpgt_epi16(key, best);  // strict: a tie keeps the earlier chunk
    best = _mm256_blendv_epi8(best, key, gt);
    best_chunk = _mm256_blendv_epi8(best_chunk, chunk, gt);
    chunk = _mm256_add_epi16(chunk, one);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys), best);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(chunks), best_chunk);
}
#endif

int64_t argmax_row(const bf16* x, int64_t V_) {
  int16_t keys[W];
  uint16_t chunks[W];
  lane_best(x, V_, keys, chunks);
  int64_t arg = -1;
  int16_t top = INT16_MIN;
  for (int64_t lane = 0; lane < W; ++lane) {
    const int64_t index = int64_t{chunks[lane]} * W + lane;
    if (lane >= V_) continue;
    if (arg < 0 || keys[lane] > top || (keys[lane] == top && index < arg)) {
      top = keys[lane];
      arg = index;
    }
  }
  return arg;
}

}  // namespace

at::Tensor argmax_rows(const at::Tensor& x) {
  check_bf16(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.size(1) <= (int64_t{1} << 20), "x must be [B, V] with 0 < V <= 2^20");
  const int64_t B = x.size(0), V_ = x.size(1);
  auto out = at::empty({B}, x.options().dtype(at::kLong));
  const bf16* px = x.data_ptr<bf16>();
  int64_t* po = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 4, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) po[r] = argmax_row(px + r * V_, V_);
  });
  return out;
}

#else  // no vectors: the model does not call these (bf16_kernels() is false)

static void unavailable() { TORCH_CHECK(false, "the fused ops need a CPU with AVX2 or AVX-512"); }
at::Tensor rms_norm(const at::Tensor&, const at::Tensor&, double) { unavailable(); return {}; }
at::Tensor add_rms_norm(at::Tensor&, const at::Tensor&, const at::Tensor&, double) { unavailable(); return {}; }
at::Tensor silu_mul(const at::Tensor&) { unavailable(); return {}; }
void rope_write_kv(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                   at::Tensor&, const at::Tensor&) { unavailable(); }
at::Tensor merge(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool) { unavailable(); return {}; }
at::Tensor argmax_rows(const at::Tensor&) { unavailable(); return {}; }
#endif

// apply_token_bitmask(x [B, V] fp32/bf16/fp16, rows [R] int64, mask [R, W] int32): x[rows[i], t] = -inf for every
// token t whose bit (t % 32 of word t / 32) is 0 in mask[i], and for t >= 32 W. In place; plain C++ (every build):
// a word of all ones is skipped, a word of zeros is one fill, so a row costs about its forbidden tokens' stores.
namespace {

template <typename T>
void mask_row(T* row, const int32_t* words, int64_t W_, int64_t V_, T neg_inf) {
  for (int64_t w = 0; w < W_; ++w) {
    const uint32_t bits = static_cast<uint32_t>(words[w]);
    const int64_t base = w * 32;
    if (bits == 0xFFFFFFFFu || base >= V_) continue;
    const int64_t end = std::min<int64_t>(base + 32, V_);
    if (bits == 0) {
      std::fill(row + base, row + end, neg_inf);
      continue;
    }
    for (int64_t t = base; t < end; ++t)
      if (!((bits >> (t - base)) & 1u)) row[t] = neg_inf;
  }
  if (W_ * 32 < V_) std::fill(row + W_ * 32, row + V_, neg_inf);
}

template <typename T>
void mask_rows(T* x, const int64_t* rows, const int32_t* mask, int64_t R, int64_t W_, int64_t V_, T neg_inf) {
  at::parallel_for(0, R, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) mask_row(x + rows[i] * V_, mask + i * W_, W_, V_, neg_inf);
  });
}

}  // namespace

void apply_token_bitmask(at::Tensor& x, const at::Tensor& rows, const at::Tensor& mask) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous CPU [B, V] tensor");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.is_contiguous(), "rows must be [R] int64");
  TORCH_CHECK(mask.scalar_type() == at::kInt && mask.dim() == 2 && mask.is_contiguous() && mask.size(0) == rows.size(0),
              "mask must be a contiguous [R, W] int32 tensor");
  const int64_t B = x.size(0), V_ = x.size(1), R = rows.size(0), W_ = mask.size(1);
  const int64_t* pr = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i) TORCH_CHECK(pr[i] >= 0 && pr[i] < B, "rows out of range");
  const int32_t* pm = mask.data_ptr<int32_t>();
  if (x.scalar_type() == at::kFloat) {
    mask_rows(x.data_ptr<float>(), pr, pm, R, W_, V_, -std::numeric_limits<float>::infinity());
  } else if (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf) {
    const uint16_t neg_inf = x.scalar_type() == at::kBFloat16 ? 0xFF80 : 0xFC00;
    mask_rows(reinterpret_cast<uint16_t*>(x.data_ptr()), pr, pm, R, W_, V_, neg_inf);
  } else {
    TORCH_CHECK(false, "x must be float32, bfloat16 or float16");
  }
}
