// Ragged paged attention with fp32 arithmetic for CPUs without AVX512-BF16 (AVX2, AVX-512F), over a bf16 (or fp32)
// cache: the same parts, visibility and outputs as ragged_attention.cpp (see its header), for parts of many rows
// (shared prefixes, prefill chunks); parts of a few rows stay with the portable loop there.
//
// A task is (part, KV head, a slice of at most TASK_ROWS rows); a row is one (query, head of the GQA group). Rows
// sit in the lanes of a vector (N = 8 with AVX2, 16 with AVX-512), so the online softmax is lane-wise, and both
// products are register-blocked FMAs with one operand broadcast from a key block converted to fp32 once per task:
//
//   qt    [tiles][D][N]      queries, scaled by scale * log2 e, transposed: one vector per (tile, dim)
//   kb    [KB][D], vb        the key block's K and V rows in fp32 (zero rows past the block's end)
//   st    [KB][tiles * N]    scores of the block (base 2), -1e30 where not visible, then probabilities
//   acc   [tiles][D][N]      output accumulators, rescaled by 2^(m_old - m_new) per block
//
//   scores:  acc[tile u][key k] += qt[u][d] * broadcast(kb[k][d])          NT tiles x NK keys in registers
//   P V:     acc[u][d]         += st[k][u]  * broadcast(vb[k][d])          NT tiles x ND dims in registers
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "vec.h"

#if defined(BATCHLLM_HAS_VEC)

namespace f32k {

using V = vec::Best;
constexpr int64_t N = V::N;
constexpr int64_t KB = 64;          // keys per block
constexpr int64_t TASK_ROWS = 128;  // rows per task (bounds the per-thread buffers to L2)
constexpr int NT = N == 16 ? 3 : 2;  // row tiles per register block
constexpr int NK = N == 16 ? 8 : 6;  // keys per register block of the scores
constexpr int ND = N == 16 ? 8 : 4;  // dims per register block of P V
constexpr float NEG = -1e30f;
constexpr float LOG2E = 1.44269504f, LN2 = 0.69314718f;

inline V load_row(const at::BFloat16* p, int64_t n) { return V::load_bf16(p, n); }
inline V load_row(const float* p, int64_t n) { return V::load(p, n); }

struct Buffers {
  std::vector<float> qt, kb, vb, st, acc, m, l, c, qpos, lo;
  void reserve(int64_t D) {
    const int64_t tiles = (TASK_ROWS + N - 1) / N + NT;  // whole register blocks, padded
    qt.resize(tiles * D * N);
    kb.resize((KB + NK) * D);
    vb.resize((KB + NK) * D);
    st.resize((KB + NK) * tiles * N);
    acc.resize(tiles * D * N);
    m.resize(tiles * N);
    l.resize(tiles * N);
    c.resize(tiles * N);
    qpos.resize(tiles * N);
    lo.resize(tiles * N);
  }
};

template <typename T>
struct Args {
  const T *q, *kv;
  const int64_t *q_ptr, *q_rows, *kv_ptr, *kv_slots, *kv_start, *q_pos;
  int64_t H, QS, KVH, D, S, window;
  float scale;
  float *out, *lse;
};

// Scores of NT tiles from `tile0` against keys b0 .. b0 + NK - 1 of the block: st[key][tile lanes].
template <int NTT>
inline void score_block(Buffers& B, int64_t tile0, int64_t b0, int64_t D, int64_t RP) {
  V acc[NTT][NK];
  for (int u = 0; u < NTT; ++u)
    for (int k = 0; k < NK; ++k) acc[u][k] = V::zero();
  const float* kb = B.kb.data() + b0 * D;
  for (int64_t d = 0; d < D; ++d) {
    V qv[NTT];
    for (int u = 0; u < NTT; ++u) qv[u] = V::load(B.qt.data() + ((tile0 + u) * D + d) * N);
    for (int k = 0; k < NK; ++k) {
      const V kv = V::set1(kb[k * D + d]);
      for (int u = 0; u < NTT; ++u) acc[u][k] = V::fma(qv[u], kv, acc[u][k]);
    }
  }
  for (int k = 0; k < NK; ++k)
    for (int u = 0; u < NTT; ++u) acc[u][k].store(B.st.data() + (b0 + k) * RP + (tile0 + u) * N);
}

// acc[tile][d0 .. d0 + ND) = acc * corr + P V over the block's nb keys, for NT tiles from `tile0`.
template <int NTT>
inline void pv_block(Buffers& B, int64_t tile0, int64_t d0, int64_t D, int64_t nb, int64_t RP) {
  V acc[NTT][ND];
  for (int u = 0; u < NTT; ++u) {
    const V corr = V::load(B.c.data() + (tile0 + u) * N);
    for (int e = 0; e < ND; ++e) acc[u][e] = V::load(B.acc.data() + ((tile0 + u) * D + d0 + e) * N) * corr;
  }
  for (int64_t b = 0; b < nb; ++b) {
    V p[NTT];
    for (int u = 0; u < NTT; ++u) p[u] = V::load(B.st.data() + b * RP + (tile0 + u) * N);
    const float* vrow = B.vb.data() + b * D + d0;
    for (int e = 0; e < ND; ++e) {
      const V vv = V::set1(vrow[e]);
      for (int u = 0; u < NTT; ++u) acc[u][e] = V::fma(p[u], vv, acc[u][e]);
    }
  }
  for (int u = 0; u < NTT; ++u)
    for (int e = 0; e < ND; ++e) acc[u][e].store(B.acc.data() + ((tile0 + u) * D + d0 + e) * N);
}

template <typename T>
void run_task(int64_t part, int64_t h, int64_t row0, int64_t R, Buffers& B, const Args<T>& a) {
  const int64_t G = a.H / a.KVH, D = a.D;
  const int64_t q0 = a.q_ptr[part], k0 = a.kv_ptr[part], nk = a.kv_ptr[part + 1] - k0, first = a.kv_start[part];
  const int64_t tiles = (R + N - 1) / N, blocks = (tiles + NT - 1) / NT, RP = blocks * NT * N;
  // queries, transposed into lanes; positions and the lowest visible key position of each row (padding rows see
  // nothing: position -1)
  int64_t max_qp = -1, min_lo = std::numeric_limits<int64_t>::max();
  const float qscale = a.scale * LOG2E;
  for (int64_t r = 0; r < RP; ++r) {
    const int64_t tile = r / N, lane = r % N;
    float* dst = B.qt.data() + tile * D * N + lane;
    if (r < R) {
      const int64_t i = (row0 + r) / G, g = (row0 + r) % G, row = a.q_rows[q0 + i];
      const T* src = a.q + row * a.QS + (h * G + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d * N] = static_cast<float>(src[d]) * qscale;
      const int64_t pos = a.q_pos[row], lo = a.window > 0 ? pos - a.window + 1 : 0;
      B.qpos[r] = static_cast<float>(pos);
      B.lo[r] = static_cast<float>(lo);
      max_qp = std::max(max_qp, pos);
      min_lo = std::min(min_lo, lo);
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d * N] = 0.f;
      B.qpos[r] = -1.f;
      B.lo[r] = 0.f;
    }
    B.m[r] = NEG;
    B.l[r] = 0.f;
  }
  std::fill(B.acc.begin(), B.acc.begin() + RP * D, 0.f);
  const int64_t row_len = a.KVH * D, v_offset = a.S * row_len;
  const int64_t j_begin = std::max<int64_t>(0, min_lo - first) / KB * KB;
  const int64_t j_end = std::min<int64_t>(nk, max_qp - first + 1);
  for (int64_t j0 = j_begin; j0 < j_end; j0 += KB) {
    const int64_t nb = std::min<int64_t>(KB, j_end - j0);
    for (int64_t b = 0; b < nb; ++b) {  // the block's K and V rows in fp32
      const int64_t slot = a.kv_slots[k0 + j0 + b];
      const T* krow = a.kv + slot * row_len + h * D;
      const T* vrow = a.kv + v_offset + slot * row_len + h * D;
      for (int64_t d = 0; d < D; d += N) {
        load_row(krow + d, D - d).store(B.kb.data() + b * D + d, D - d);
        load_row(vrow + d, D - d).store(B.vb.data() + b * D + d, D - d);
      }
    }
    std::fill(B.kb.begin() + nb * D, B.kb.begin() + (nb + NK) * D, 0.f);
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t b0 = 0; b0 < nb; b0 += NK) score_block<NT>(B, blk * NT, b0, D, RP);
    // visibility, then the online softmax, lane-wise per tile
    const float kpos0 = static_cast<float>(first + j0);
    for (int64_t tile = 0; tile < blocks * NT; ++tile) {
      const V qpos = V::load(B.qpos.data() + tile * N), lo = V::load(B.lo.data() + tile * N);
      V mx = V::set1(NEG);
      for (int64_t b = 0; b < nb; ++b) {
        float* s = B.st.data() + b * RP + tile * N;
        const V kp = V::set1(kpos0 + static_cast<float>(b));
        const V sv = V::select(V::visible(kp, qpos, lo), V::load(s), V::set1(NEG));
        mx = V::max(mx, sv);
        sv.store(s);
      }
      const V m_old = V::load(B.m.data() + tile * N), m_new = V::max(m_old, mx);
      const V corr = vec::exp2<V, 5>(m_old - m_new);
      // a row that has seen no key yet has m_new = NEG: subtracting at least -1e20 keeps its masked scores at ~NEG,
      // whose 2^x is 0
      const V m_sub = V::max(m_new, V::set1(-1e20f));
      V sum = V::load(B.l.data() + tile * N) * corr;
      for (int64_t b = 0; b < nb; ++b) {
        float* s = B.st.data() + b * RP + tile * N;
        const V p = vec::exp2<V, 5>(V::load(s) - m_sub);
        sum = sum + p;
        p.store(s);
      }
      m_new.store(B.m.data() + tile * N);
      sum.store(B.l.data() + tile * N);
      corr.store(B.c.data() + tile * N);
    }
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t d0 = 0; d0 < D; d0 += ND) pv_block<NT>(B, blk * NT, d0, D, nb, RP);
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t tile = r / N, lane = r % N;
    const int64_t i = (row0 + r) / G, g = (row0 + r) % G, head = h * G + g;
    float* o = a.out + ((q0 + i) * a.H + head) * D;
    const bool seen = B.l[r] > 0.f;
    const float inv = seen ? 1.f / B.l[r] : 0.f;
    const float* acc = B.acc.data() + tile * D * N + lane;
    for (int64_t d = 0; d < D; ++d) o[d] = acc[d * N] * inv;
    a.lse[(q0 + i) * a.H + head] = seen ? (B.m[r] + std::log2(B.l[r])) * LN2 : NEG;
  }
}

}  // namespace f32k

// Parts with more than `min_rows` rows per KV head (the others are left to the caller), each split into tasks.
// Returns whether head_dim suits the register blocks (a multiple of ND); else nothing was computed.
template <typename T>
bool f32_attention(const T* q, const T* kv, const int64_t* q_ptr, const int64_t* q_rows, const int64_t* kv_ptr,
                   const int64_t* kv_slots, const int64_t* kv_start, const int64_t* q_pos, int64_t num_parts,
                   int64_t H, int64_t QS, int64_t KVH, int64_t D, int64_t S, int64_t window, float scale, float* out,
                   float* lse, int64_t min_rows) {
  using namespace f32k;
  if (D % ND != 0) return false;
  struct Task {
    int64_t part, head, row0, rows;
  };
  const int64_t G = H / KVH;
  std::vector<Task> tasks;
  for (int64_t p = 0; p < num_parts; ++p) {
    const int64_t R = (q_ptr[p + 1] - q_ptr[p]) * G;
    if (R <= min_rows) continue;
    for (int64_t h = 0; h < KVH; ++h)
      for (int64_t r0 = 0; r0 < R; r0 += TASK_ROWS) tasks.push_back({p, h, r0, std::min(TASK_ROWS, R - r0)});
  }
  auto work = [&](const Task& t) { return t.rows * (kv_ptr[t.part + 1] - kv_ptr[t.part]); };
  std::sort(tasks.begin(), tasks.end(), [&](const Task& x, const Task& y) { return work(x) > work(y); });
  const Args<T> args{q, kv, q_ptr, q_rows, kv_ptr, kv_slots, kv_start, q_pos, H, QS, KVH, D, S, window, scale, out, lse};
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
#pragma omp parallel
  {
    Buffers B;
    B.reserve(D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_tasks; ++i) run_task(tasks[i].part, tasks[i].head, tasks[i].row0, tasks[i].rows, B, args);
  }
  return true;
}

template bool f32_attention<at::BFloat16>(const at::BFloat16*, const at::BFloat16*, const int64_t*, const int64_t*,
                                          const int64_t*, const int64_t*, const int64_t*, const int64_t*, int64_t,
                                          int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, float*, float*,
                                          int64_t);
template bool f32_attention<float>(const float*, const float*, const int64_t*, const int64_t*, const int64_t*,
                                   const int64_t*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t,
                                   int64_t, int64_t, int64_t, float, float*, float*, int64_t);

#endif
