// Ragged paged attention for CPU: many small attention parts read straight from the paged KV cache.
//
// A part is a set of query rows against one KV segment (consecutive positions kv_start .. kv_start + len - 1 whose
// K/V live at the given flat cache slots). The engine uses this kernel for parts with few query rows (decode steps,
// short chunks), where a generic fused kernel pays a fixed cost per (part, head) far above the cost of reading the
// keys. Work is split over (part, kv head) with OpenMP; each task streams the part's keys once and keeps an online
// softmax per query row (flash-attention style), so K/V are never gathered or padded.
//
//   q        [T, H, D]            bf16 or fp32 queries of this step
//   kv       [2, S, KVH, D]       the layer's cache, flat over slots (same dtype as q)
//   q_ptr    [P + 1]              part p owns q_rows[q_ptr[p] : q_ptr[p + 1]]
//   q_rows   [NQ]                 packed row of each (part, query)
//   kv_ptr   [P + 1]              part p owns kv_slots[kv_ptr[p] : kv_ptr[p + 1]]
//   kv_slots [NK]                 flat cache slot of each key
//   kv_start [P]                  position of the part's first key
//   q_pos    [T]                  position of each packed row
// Returns out [NQ, H, D] fp32 and lse [NQ, H] fp32 (natural log; -1e30 where a row sees no key of the part).
// Visibility: key position kp is seen by a query at qp iff kp <= qp and (window == 0 or kp > qp - window).

#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t KEY_BLOCK = 32;
constexpr float NEG = -1e30f;  // finite "minus infinity": the kernel is built with -ffast-math

inline void load_row(const float* src, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = src[d];
}

inline void load_row(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* raw = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t d = 0; d < n; ++d) out[d] = static_cast<uint32_t>(raw[d]) << 16;  // bf16 -> fp32 is a shift
}

template <typename scalar_t>
void ragged_kernel(const scalar_t* q, const scalar_t* kv, const int64_t* q_ptr, const int64_t* q_rows,
                   const int64_t* kv_ptr, const int64_t* kv_slots, const int64_t* kv_start, const int64_t* q_pos,
                   int64_t num_parts, int64_t H, int64_t KVH, int64_t D, int64_t S, int64_t window, float scale,
                   float* out, float* lse) {
  const int64_t G = H / KVH;
  const int64_t v_offset = S * KVH * D;  // V half of the cache
#pragma omp parallel
  {
    std::vector<float> qf, acc, m, l, kblk(KEY_BLOCK * D), kt(D * KEY_BLOCK), vblk(KEY_BLOCK * D), sc(KEY_BLOCK);
    std::vector<int64_t> qp;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_parts * KVH; ++task) {
      const int64_t p = task / KVH, h = task % KVH;
      const int64_t q0 = q_ptr[p], nq = q_ptr[p + 1] - q0;
      const int64_t k0 = kv_ptr[p], nk = kv_ptr[p + 1] - k0;
      const int64_t R = nq * G;  // rows: (query, head in group)
      if (R == 0) continue;
      qf.resize(R * D);
      acc.assign(R * D, 0.f);
      m.assign(R, NEG);
      l.assign(R, 0.f);
      qp.resize(nq);
      int64_t max_qp = 0, min_qp = 0;
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t row = q_rows[q0 + i];
        qp[i] = q_pos[row];
        max_qp = i == 0 ? qp[i] : std::max(max_qp, qp[i]);
        min_qp = i == 0 ? qp[i] : std::min(min_qp, qp[i]);
        for (int64_t g = 0; g < G; ++g) {
          float* dst = qf.data() + (i * G + g) * D;
          load_row(q + (row * H + h * G + g) * D, dst, D);
          for (int64_t d = 0; d < D; ++d) dst[d] *= scale;
        }
      }
      const int64_t first = kv_start[p];
      int64_t j_begin = 0;
      if (window > 0) j_begin = std::max<int64_t>(0, min_qp - window + 1 - first);
      const int64_t j_end = std::min<int64_t>(nk, max_qp - first + 1);  // keys past every query are invisible
      for (int64_t j0 = j_begin; j0 < j_end; j0 += KEY_BLOCK) {
        const int64_t nb = std::min<int64_t>(KEY_BLOCK, j_end - j0);
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t slot = kv_slots[k0 + j0 + b];
          load_row(kv + (slot * KVH + h) * D, kblk.data() + b * D, D);
          load_row(kv + v_offset + (slot * KVH + h) * D, vblk.data() + b * D, D);
        }
        // K transposed to [D][KEY_BLOCK] (zero past nb), so scores of a row are an outer-product sweep over d,
        // vectorised across the block's keys without horizontal sums.
        for (int64_t d = 0; d < D; ++d) {
          float* dst = kt.data() + d * KEY_BLOCK;
          for (int64_t b = 0; b < nb; ++b) dst[b] = kblk[b * D + d];
          for (int64_t b = nb; b < KEY_BLOCK; ++b) dst[b] = 0.f;
        }
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t lo = window > 0 ? qp[i] - window + 1 : first;  // visible key positions [lo, qp]
          for (int64_t g = 0; g < G; ++g) {
            const int64_t r = i * G + g;
            const float* qr = qf.data() + r * D;
            float* scp = sc.data();
            for (int64_t b = 0; b < KEY_BLOCK; ++b) scp[b] = 0.f;
            for (int64_t d = 0; d < D; ++d) {
              const float qd = qr[d];
              const float* ktd = kt.data() + d * KEY_BLOCK;
#pragma omp simd
              for (int64_t b = 0; b < KEY_BLOCK; ++b) scp[b] += qd * ktd[b];
            }
            float bmax = NEG;
            for (int64_t b = 0; b < nb; ++b) {
              const int64_t kp = first + j0 + b;
              scp[b] = (kp <= qp[i] && kp >= lo) ? scp[b] : NEG;
              bmax = std::max(bmax, scp[b]);
            }
            if (bmax <= NEG) continue;  // nothing visible in this block
            float* a = acc.data() + r * D;
            const float mnew = std::max(m[r], bmax);
            const float c = std::exp(m[r] - mnew);
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int64_t b = 0; b < nb; ++b) {  // masked scores are -1e30: exp underflows to 0
              scp[b] = expf(scp[b] - mnew);
              sum += scp[b];
            }
            l[r] = l[r] * c + sum;
            m[r] = mnew;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) a[d] *= c;
            for (int64_t b = 0; b < nb; ++b) {
              const float e = sc[b];
              const float* vr = vblk.data() + b * D;
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) a[d] += e * vr[d];
            }
          }
        }
      }
      for (int64_t i = 0; i < nq; ++i) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = i * G + g, head = h * G + g;
          float* o = out + ((q0 + i) * H + head) * D;
          const float* a = acc.data() + r * D;
          const bool seen = l[r] > 0.f;
          const float inv = seen ? 1.f / l[r] : 0.f;
          for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
          lse[(q0 + i) * H + head] = seen ? m[r] + std::log(l[r]) : NEG;
        }
      }
    }
  }
}

}  // namespace

std::vector<torch::Tensor> ragged_attention(torch::Tensor q, torch::Tensor kv, torch::Tensor q_ptr,
                                            torch::Tensor q_rows, torch::Tensor kv_ptr, torch::Tensor kv_slots,
                                            torch::Tensor kv_start, torch::Tensor q_pos, int64_t window,
                                            double scale) {
  TORCH_CHECK(q.is_contiguous() && kv.is_contiguous(), "q and kv must be contiguous");
  TORCH_CHECK(q.scalar_type() == kv.scalar_type(), "q and kv must share a dtype");
  const int64_t H = q.size(1), D = q.size(2), KVH = kv.size(2), S = kv.size(1);
  TORCH_CHECK(H % KVH == 0, "query heads must be a multiple of kv heads");
  const int64_t P = kv_start.size(0), NQ = q_rows.size(0);
  auto out = torch::empty({NQ, H, D}, q.options().dtype(torch::kFloat32));
  auto lse = torch::empty({NQ, H}, q.options().dtype(torch::kFloat32));
  const int64_t* ptrs[6] = {q_ptr.data_ptr<int64_t>(), q_rows.data_ptr<int64_t>(), kv_ptr.data_ptr<int64_t>(),
                            kv_slots.data_ptr<int64_t>(), kv_start.data_ptr<int64_t>(), q_pos.data_ptr<int64_t>()};
  if (q.scalar_type() == at::ScalarType::BFloat16) {
    ragged_kernel<at::BFloat16>(q.data_ptr<at::BFloat16>(), kv.data_ptr<at::BFloat16>(), ptrs[0], ptrs[1], ptrs[2],
                                ptrs[3], ptrs[4], ptrs[5], P, H, KVH, D, S, window, static_cast<float>(scale),
                                out.data_ptr<float>(), lse.data_ptr<float>());
  } else {
    TORCH_CHECK(q.scalar_type() == at::ScalarType::Float, "ragged_attention takes bf16 or fp32");
    ragged_kernel<float>(q.data_ptr<float>(), kv.data_ptr<float>(), ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4],
                         ptrs[5], P, H, KVH, D, S, window, static_cast<float>(scale), out.data_ptr<float>(),
                         lse.data_ptr<float>());
  }
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ragged_attention", &ragged_attention, "ragged paged attention over small parts (CPU)");
}
