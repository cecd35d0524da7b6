// Fused bf16 element-wise ops of the decoder layer for CPU. Each reads and writes its tensors once, computing in fp32;
// the torch equivalents make one pass (and one bf16 rounding) per operator. Rows are split over torch's threads.
//
//   rms_norm(x [T, N], w [N], eps) -> [T, N]                  bf16(w * bf16(x * rsqrt(mean(x^2) + eps)))  (HF order)
//   add_rms_norm(x [T, N], delta [T, N], w, eps) -> [T, N]    x += delta (in place, rounded to bf16), then rms_norm(x)
//   silu_mul(gu [T, 2I]) -> [T, I]                           silu(gate) * up, gate = gu[:, :I], up = gu[:, I:]
//   rope_write_kv(q [T, H, D], k [T, KVH, D], v, cos [P, D], sin [P, D], positions [T], kv [2, S, KVH, D],
//                 slots [T])                                 rotates q and k in place (rotate_half convention) and
//                                                            writes k, v to cache slot slots[t] (skipped if < 0)
//   merge(out [N, H, D] fp32, lse [N, H] fp32, index [T, L]) -> [T, H, D] bf16
//                                                            per row: sum_l softmax(lse[index[t, l]]) * out[index[t, l]]
//                                                            (index >= N: no partial result)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using bf16 = at::BFloat16;
constexpr float NEG = -1e30f;  // finite "minus infinity" (built with -ffast-math)

inline float f(bf16 x) { return static_cast<float>(x); }

void check_bf16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous bf16 CPU tensor");
}

void norm_rows(const bf16* x, const bf16* w, bf16* out, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += f(x[i]) * f(x[i]);
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = bf16(f(w[i]) * f(bf16(f(x[i]) * inv)));
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
    for (int64_t r = b; r < e; ++r) norm_rows(px + r * n, pw, po + r * n, n, static_cast<float>(eps));
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
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) xr[i] = bf16(f(xr[i]) + f(dr[i]));
      norm_rows(xr, pw, po + r * n, n, static_cast<float>(eps));
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
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        const float x = f(g[i]);
        o[i] = bf16(f(bf16(x / (1.f + std::exp(-x)))) * f(u[i]));  // torch: silu rounds, then the product rounds
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
  const int64_t S = kv.size(1);
  bf16 *pq = q.data_ptr<bf16>(), *pk = k.data_ptr<bf16>(), *pkv = kv.data_ptr<bf16>();
  const bf16* pv = v.data_ptr<bf16>();
  const bf16 *pc = cos.data_ptr<bf16>(), *ps = sin.data_ptr<bf16>();
  const int64_t* ppos = positions.data_ptr<int64_t>();
  const int64_t* pslot = slots.data_ptr<int64_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1);
  at::parallel_for(0, T, 8, [&](int64_t b, int64_t e) {
    std::vector<float> tmp(D);
    for (int64_t t = b; t < e; ++t) {
      const bf16* c = pc + ppos[t] * D;
      const bf16* s = ps + ppos[t] * D;
      auto rotate = [&](bf16* x) {  // x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
        for (int64_t i = 0; i < half; ++i) {
          tmp[i] = f(x[i]) * f(c[i]) - f(x[i + half]) * f(s[i]);
          tmp[i + half] = f(x[i + half]) * f(c[i + half]) + f(x[i]) * f(s[i + half]);
        }
        for (int64_t i = 0; i < D; ++i) x[i] = bf16(tmp[i]);
      };
      for (int64_t h = 0; h < H; ++h) rotate(pq + t * qs0 + h * qs1);
      for (int64_t h = 0; h < KVH; ++h) rotate(pk + t * ks0 + h * ks1);
      const int64_t slot = pslot[t];
      if (slot < 0) continue;
      TORCH_CHECK(slot < S, "cache slot out of range");
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
    std::vector<float> acc(D), wts(L);
    for (int64_t t = b; t < e; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        float mx = NEG;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t j = pi[t * L + l];
          wts[l] = j < N ? pl[j * H + h] : NEG;
          mx = std::max(mx, wts[l]);
        }
        float total = 0.f;
        for (int64_t l = 0; l < L; ++l) {
          wts[l] = pi[t * L + l] < N && wts[l] > NEG ? std::exp(wts[l] - mx) : 0.f;
          total += wts[l];
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t l = 0; l < L; ++l) {
          if (wts[l] == 0.f) continue;
          const float wl = wts[l] / total;
          const float* src = po + (pi[t * L + l] * H + h) * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc[d] += wl * src[d];
        }
        bf16* dst = pr + (t * H + h) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = bf16(acc[d]);
      }
    }
  });
  return res;
}
