// Fused bf16 element-wise ops of the decoder layer for CPU (AVX-512). Each reads and writes its tensors once,
// computing in fp32; the torch equivalents make one pass (and one bf16 rounding) per operator. Rows are split over
// torch's threads. Built only where the CPU has AVX512-BF16 (`available()`); elsewhere the model uses torch ops.
//
//   rms_norm(x [T, N], w [N], eps) -> [T, N]                  bf16(w * bf16(x * rsqrt(mean(x^2) + eps)))  (HF order)
//   add_rms_norm(x [T, N], delta [T, N], w, eps) -> [T, N]    x += delta (in place, rounded to bf16), then rms_norm(x)
//   silu_mul(gu [T, 2I]) -> [T, I]                           bf16(bf16(silu(gate)) * up), gate = gu[:, :I], up = gu[:, I:]
//   rope_write_kv(q [T, H, D], k [T, KVH, D], v, cos [P, D], sin [P, D], positions [T], kv [2, S, KVH, D],
//                 slots [T])                                 rotates q and k in place (rotate_half convention, fp32,
//                                                            one rounding) and writes k, v to cache slot slots[t]
//                                                            (skipped if < 0); q, k, v rows may be strided
//   merge(out [N, H, D] fp32, lse [N, H] fp32, index [T, L]) -> [T, H, D] bf16
//                                                            per row: sum_l softmax(lse[index[t, l]]) * out[index[t, l]]
//                                                            (index >= N: no partial result)
//   argmax_rows(x [B, V]) -> [B] int64                       per row the index of the largest value, the lowest
//                                                            among ties; as torch.argmax of the fp32 values (a NaN
//                                                            beats everything, the first NaN wins; -0 equals +0)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

bool bf16_kernels() {
#ifdef BATCHLLM_HAS_BF16_KERNEL
  return true;
#else
  return false;
#endif
}

#ifdef BATCHLLM_HAS_BF16_KERNEL
namespace {

using bf16 = at::BFloat16;
using simd::load_bf16;
using simd::round_bf16;
using simd::store_bf16;
constexpr float NEG = -1e30f;  // finite "minus infinity" (built with -ffast-math)

void check_bf16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous bf16 CPU tensor");
}

void norm_row(const bf16* x, const bf16* w, bf16* out, int64_t n, float eps) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = load_bf16(x + i, n - i);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(n) + eps));
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 h = round_bf16(_mm512_mul_ps(load_bf16(x + i, n - i), inv));
    store_bf16(out + i, _mm512_mul_ps(load_bf16(w + i, n - i), h), n - i);
  }
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_bf16(x, "x");
  check_bf16(w, "w");
  const int64_t n = x.size(-1), rows = x.numel() / n;
  auto out = at::empty_like(x);
  const bf16 *px = x.data_ptr<bf16>(), *pw = w.data_ptr<bf16>();
  bf16* po = out.data_ptr<bf16>();
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) norm_row(px + r * n, pw, po + r * n, n, static_cast<float>(eps));
  });
  return out;
}

at::Tensor add_rms_norm(at::Tensor& x, const at::Tensor& delta, const at::Tensor& w, double eps) {
  check_bf16(x, "x");
  check_bf16(delta, "delta");
  check_bf16(w, "w");
  TORCH_CHECK(x.sizes() == delta.sizes(), "x and delta differ in shape");
  const int64_t n = x.size(-1), rows = x.numel() / n;
  auto out = at::empty_like(x);
  bf16* px = x.data_ptr<bf16>();
  const bf16 *pd = delta.data_ptr<bf16>(), *pw = w.data_ptr<bf16>();
  bf16* po = out.data_ptr<bf16>();
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      bf16* xr = px + r * n;
      const bf16* dr = pd + r * n;
      for (int64_t i = 0; i < n; i += 16)
        store_bf16(xr + i, _mm512_add_ps(load_bf16(xr + i, n - i), load_bf16(dr + i, n - i)), n - i);
      norm_row(xr, pw, po + r * n, n, static_cast<float>(eps));
    }
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gu) {
  check_bf16(gu, "gu");
  const int64_t two_i = gu.size(-1), inter = two_i / 2, rows = gu.numel() / two_i;
  auto out = at::empty({rows, inter}, gu.options());
  const bf16* pg = gu.data_ptr<bf16>();
  bf16* po = out.data_ptr<bf16>();
  at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const bf16* g = pg + r * two_i;
      const bf16* u = g + inter;
      bf16* o = po + r * inter;
      for (int64_t i = 0; i < inter; i += 16) {
        const __m512 silu = simd::silu_bf16(load_bf16(g + i, inter - i));
        store_bf16(o + i, _mm512_mul_ps(silu, load_bf16(u + i, inter - i)), inter - i);
      }
    }
  });
  return out;
}

void rope_write_kv(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                   const at::Tensor& positions, at::Tensor& kv, const at::Tensor& slots) {
  check_bf16(cos, "cos");
  check_bf16(sin, "sin");
  check_bf16(kv, "kv");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "q, k, v must be bf16");
  const int64_t T = q.size(0), H = q.size(1), KVH = k.size(1), D = q.size(2), half = D / 2;
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "q, k, v need a contiguous last dim");
  TORCH_CHECK(D % 2 == 0 && kv.size(2) == KVH && kv.size(3) == D, "cache and head shapes differ");
  const int64_t S = kv.size(1);
  bf16 *pq = q.data_ptr<bf16>(), *pk = k.data_ptr<bf16>(), *pkv = kv.data_ptr<bf16>();
  const bf16* pv = v.data_ptr<bf16>();
  const bf16 *pc = cos.data_ptr<bf16>(), *ps = sin.data_ptr<bf16>();
  const int64_t* ppos = positions.data_ptr<int64_t>();
  const int64_t* pslot = slots.data_ptr<int64_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(pslot[t] < S, "cache slot out of range");
    TORCH_CHECK(ppos[t] >= 0 && ppos[t] < cos.size(0), "position outside the rotary table");
  }
  at::parallel_for(0, T, 8, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const bf16* c = pc + ppos[t] * D;
      const bf16* s = ps + ppos[t] * D;
      auto rotate = [&](bf16* x) {  // x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
        for (int64_t i = 0; i < half; i += 16) {
          const int64_t n = half - i;
          const __m512 x1 = load_bf16(x + i, n), x2 = load_bf16(x + half + i, n);
          const __m512 o1 = _mm512_fnmadd_ps(x2, load_bf16(s + i, n), _mm512_mul_ps(x1, load_bf16(c + i, n)));
          const __m512 o2 = _mm512_fmadd_ps(x1, load_bf16(s + half + i, n), _mm512_mul_ps(x2, load_bf16(c + half + i, n)));
          store_bf16(x + i, o1, n);
          store_bf16(x + half + i, o2, n);
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
}

at::Tensor merge(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& index) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && lse.scalar_type() == at::kFloat && out.is_contiguous() &&
              lse.is_contiguous() && index.is_contiguous(), "merge takes contiguous fp32 out and lse");
  const int64_t N = out.size(0), H = out.size(1), D = out.size(2), T = index.size(0), L = index.size(1);
  auto res = at::empty({T, H, D}, out.options().dtype(at::kBFloat16));
  const float *po = out.data_ptr<float>(), *pl = lse.data_ptr<float>();
  const int64_t* pi = index.data_ptr<int64_t>();
  bf16* pr = res.data_ptr<bf16>();
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    std::vector<float> wts(L);
    for (int64_t t = b; t < e; ++t) {
      const int64_t* idx = pi + t * L;
      for (int64_t h = 0; h < H; ++h) {
        float mx = NEG;
        for (int64_t l = 0; l < L; ++l) mx = std::max(mx, idx[l] < N ? pl[idx[l] * H + h] : NEG);
        float total = 0.f;
        for (int64_t l = 0; l < L; ++l) {
          wts[l] = idx[l] < N && pl[idx[l] * H + h] > NEG ? std::exp(pl[idx[l] * H + h] - mx) : 0.f;
          total += wts[l];
        }
        bf16* dst = pr + (t * H + h) * D;
        for (int64_t d = 0; d < D; d += 16) {
          __m512 acc = _mm512_setzero_ps();
          for (int64_t l = 0; l < L; ++l) {
            if (wts[l] == 0.f) continue;
            const float* src = po + (idx[l] * H + h) * D + d;
            const __m512 v = D - d >= 16 ? _mm512_loadu_ps(src)
                                         : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (D - d)) - 1u), src);
            acc = _mm512_fmadd_ps(_mm512_set1_ps(wts[l] / total), v, acc);
          }
          store_bf16(dst + d, acc, D - d);
        }
      }
    }
  });
  return res;
}

namespace {

// bf16 bits -> int16 keys ordered as the values: x >= 0 keeps its bits, x < 0 becomes -(bits of |x|), so -0 and +0
// are equal; every NaN gets one key above +inf (0x7F80). Integers, so -ffast-math cannot assume the NaNs away.
inline __m512i order_keys(__m512i bits) {
  const __m512i mag = _mm512_and_si512(bits, _mm512_set1_epi16(0x7FFF));
  const __m512i key = _mm512_mask_sub_epi16(mag, _mm512_movepi16_mask(bits), _mm512_setzero_si512(), mag);
  return _mm512_mask_mov_epi16(key, _mm512_cmpgt_epi16_mask(mag, _mm512_set1_epi16(0x7F80)), _mm512_set1_epi16(0x7F81));
}

// Lane l of chunk c holds element 32 c + l; each lane keeps its largest key and the first chunk holding it.
int64_t argmax_row(const bf16* x, int64_t V) {
  __m512i best = _mm512_set1_epi16(INT16_MIN), best_chunk = _mm512_setzero_si512(), chunk = _mm512_setzero_si512();
  const __m512i one = _mm512_set1_epi16(1);
  for (int64_t i = 0; i < V; i += 32) {
    __m512i key;
    if (V - i >= 32) {
      key = order_keys(_mm512_loadu_si512(x + i));
    } else {  // lanes past the row's end keep INT16_MIN, below every real key
      const __mmask32 valid = static_cast<__mmask32>((uint64_t{1} << (V - i)) - 1u);
      key = _mm512_mask_mov_epi16(_mm512_set1_epi16(INT16_MIN), valid,
                                  order_keys(_mm512_maskz_loadu_epi16(valid, x + i)));
    }
    const __mmask32 gt = _mm512_cmpgt_epi16_mask(key, best);  // strict: a tie keeps the earlier chunk
    best = _mm512_mask_mov_epi16(best, gt, key);
    best_chunk = _mm512_mask_mov_epi16(best_chunk, gt, chunk);
    chunk = _mm512_add_epi16(chunk, one);
  }
  alignas(64) int16_t keys[32];
  alignas(64) uint16_t chunks[32];
  _mm512_store_si512(keys, best);
  _mm512_store_si512(chunks, best_chunk);
  int64_t arg = -1;
  int16_t top = INT16_MIN;
  for (int64_t lane = 0; lane < 32; ++lane) {
    const int64_t index = int64_t{chunks[lane]} * 32 + lane;
    if (lane >= V) continue;
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
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.size(1) <= (int64_t{1} << 21), "x must be [B, V] with 0 < V <= 2^21");
  const int64_t B = x.size(0), V = x.size(1);
  auto out = at::empty({B}, x.options().dtype(at::kLong));
  const bf16* px = x.data_ptr<bf16>();
  int64_t* po = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 4, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) po[r] = argmax_row(px + r * V, V);
  });
  return out;
}

#else  // no AVX512-BF16: the model does not call these (bf16_kernels() is false)

static void unavailable() { TORCH_CHECK(false, "fused ops need a CPU with AVX512-BF16"); }
at::Tensor rms_norm(const at::Tensor&, const at::Tensor&, double) { unavailable(); return {}; }
at::Tensor add_rms_norm(at::Tensor&, const at::Tensor&, const at::Tensor&, double) { unavailable(); return {}; }
at::Tensor silu_mul(const at::Tensor&) { unavailable(); return {}; }
void rope_write_kv(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                   at::Tensor&, const at::Tensor&) { unavailable(); }
at::Tensor merge(const at::Tensor&, const at::Tensor&, const at::Tensor&) { unavailable(); return {}; }
at::Tensor argmax_rows(const at::Tensor&) { unavailable(); return {}; }
#endif
