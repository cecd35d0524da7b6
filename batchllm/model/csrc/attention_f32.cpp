// Ragged paged attention with fp32 arithmetic for CPUs without AVX512-BF16 (AVX2, AVX-512F), over a bf16 (or fp32)
// cache: the same parts, visibility and outputs as ragged_attention.cpp (see its header). Two kernels:
//  - run_task, for parts of many rows (shared prefixes, prefill chunks): rows in the vector lanes, below;
//  - run_small, for parts of a few rows per KV head (a decode: one query times the GQA group): see its comment.
//
// A task is (part, KV head, a slice of at most TASK_ROWS rows); a row is one (query, head of the GQA group). Rows
// sit in the lanes of a vector (N = 8 with AVX2, 16 with AVX-512), so the online softmax is lane-wise, and both
// products are register-blocked FMAs with one operand broadcast from a key block converted to fp32 once per task:
//
//   qt    [tiles][D][N]      queries, scaled (see NATURAL), transposed: one vector per (tile, dim)
//   kb    [KB][D], vb        the key block's K and V rows in fp32 (zero rows past the block's end)
//   st    [KB][tiles * N]    scores of the block, -1e30 where not visible, then probabilities
//   acc   [tiles][D][N]      output accumulators, rescaled by base^(m_old - m_new) per block
//
//   scores:  acc[tile u][key k] += qt[u][d] * broadcast(kb[k][d])          NT tiles x NK keys in registers
//   P V:     acc[u][d]         += st[k][u]  * broadcast(vb[k][d])          NT tiles x ND dims in registers
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec.h"

#if defined(BATCHLLM_HAS_VEC)

namespace f32k {

using V = vec::Best;
constexpr int64_t N = V::N;
constexpr int64_t KB = 64;          // keys per block
constexpr int64_t TASK_ROWS = 144;  // rows per task, whole register blocks at 8 and 16 lanes (buffers fit L2)
constexpr int64_t SKB = 16;         // keys per block of run_small
// register blocks: NT x NK score accumulators + NT query vectors + 1 broadcast key fit the registers (16 with AVX2,
// 32 with AVX-512), as do NT x ND accumulators of P V
constexpr int NT = 3;                // row tiles per register block
constexpr int NK = N == 16 ? 8 : 4;  // keys per register block of the scores
constexpr int ND = N == 16 ? 8 : 4;  // dims per register block of P V
constexpr float NEG = -1e30f;
constexpr float LOG2E = 1.44269504f, LN2 = 0.69314718f;
constexpr float LAZY = 8.f;  // run_small's running maximum may sit this far below a row's top score (base units)
// e^x to about an ulp: n = round(x log2 e), r = x - n ln 2 in two parts (|r| <= ln 2 / 2), e^r by its Taylor
// polynomial of degree 7 (truncation ~5e-9). Results below fp32's normal range (x < -87) come out 0 or subnormal.
inline V exp_nat(V x) {
  x = V::max(x, V::set1(-104.f));
  const V n = (x * V::set1(LOG2E)).round();
  V r = V::fma(n, V::set1(-0.693145751953125f), x);  // ln 2's high part: exact times any n in range
  r = V::fma(n, V::set1(-1.428606765330187e-6f), r);
  V p = V::set1(1.f / 5040);
  p = V::fma(p, r, V::set1(1.f / 720));
  p = V::fma(p, r, V::set1(1.f / 120));
  p = V::fma(p, r, V::set1(1.f / 24));
  p = V::fma(p, r, V::set1(1.f / 6));
  p = V::fma(p, r, V::set1(0.5f));
  p = V::fma(p, r, V::set1(1.f));
  p = V::fma(p, r, V::set1(1.f));
  return p.times_2n(n);
}

// The softmax's base. Over an fp32 cache (the exact dtype) it is e, as in HF's softmax: the queries are scaled by
// `scale`, and exp_nat keeps prompt logprobs within 1e-5 of HF's (tests/test_scoring.py: 5.0e-6 to 6.9e-6); the
// base-2 form, as over bf16, took them to 1.1e-5 to 1.4e-5. Over a bf16 cache it is 2: the queries are scaled by
// scale * log2 e once, and a degree-5 2^x (relative error ~3e-6) is ample where the values carry ~4e-3.
template <typename T>
constexpr bool NATURAL = std::is_same_v<T, float>;
template <typename T>
inline V softmax_exp(V x) {
  if constexpr (NATURAL<T>) return exp_nat(x);
  else return vec::exp2<V, 5>(x);
}

// The log-sum-exp of a row in natural log, from its running maximum m and sum l (in the softmax's base).
template <typename T>
inline float row_lse(float m, float l) {
  return NATURAL<T> ? m + std::log(l) : (m + std::log2(l)) * LN2;
}

inline V load_row(const at::BFloat16* p, int64_t n) { return V::load_bf16(p, n); }
inline V load_row(const float* p, int64_t n) { return V::load(p, n); }

struct Buffers {
  std::vector<float> qt, kb, vb, st, acc, m, l, c, qpos, lo;
  std::vector<int64_t> tile_qpos, tile_lo;  // per tile: the lowest position and the highest lo of its rows
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
    tile_qpos.resize(tiles);
    tile_lo.resize(tiles);
  }
};

// The next key block's K and V rows (every head), prefetched a few cache lines per call, so the fetches spread
// over this block's work (a burst would stall on the core's few miss buffers).
struct PrefetchQueue {
  const char* rows[2 * SKB];  // the next block's K and V rows, each `lines` cache lines
  int64_t n_rows = 0, lines = 0;
  int64_t row = 0, line = 0;  // the next line to fetch
  void issue(int64_t count) {
    for (; count > 0 && row < n_rows; --count) {
      _mm_prefetch(rows[row] + line * 64, _MM_HINT_T0);
      if (++line == lines) line = 0, ++row;
    }
  }
  void issue_all() { issue((n_rows - row) * lines); }
};

// Work space of run_small, grown to the largest task a thread meets.
struct SmallBuffers {
  std::vector<float> qs, acc, m, l, corr, sr, qpos, lo;
  PrefetchQueue pf;
  void reserve(int64_t rows, int64_t D) {  // rows: KV heads x rows per head
    auto grow = [](std::vector<float>& v, int64_t n) {
      if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    };
    grow(qs, rows * D);
    grow(acc, rows * D);
    grow(m, rows);
    grow(l, rows * N);
    grow(qpos, rows);
    grow(lo, rows);
    grow(corr, rows);
    grow(sr, rows * (SKB + N));
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

// f(std::integral_constant<int, n>) with n = min(left, NT): a register block of the tiles that are left.
template <typename F>
inline void by_tiles(int64_t left, F&& f) {
  if (left >= NT) f(std::integral_constant<int, NT>{});
  else if (NT > 2 && left == 2) f(std::integral_constant<int, 2>{});
  else f(std::integral_constant<int, 1>{});
}

template <typename T>
void run_task(int64_t part, int64_t h, int64_t row0, int64_t R, Buffers& B, const Args<T>& a) {
  const int64_t G = a.H / a.KVH, D = a.D;
  const int64_t q0 = a.q_ptr[part], k0 = a.kv_ptr[part], nk = a.kv_ptr[part + 1] - k0, first = a.kv_start[part];
  // rows padded to whole tiles (not to whole register blocks: the last block holds the tiles that are left)
  const int64_t tiles = (R + N - 1) / N, RP = tiles * N;
  // queries, transposed into lanes; positions and the lowest visible key position of each row (padding rows see
  // nothing: position -1)
  int64_t max_qp = -1, min_lo = std::numeric_limits<int64_t>::max();
  const float qscale = NATURAL<T> ? a.scale : a.scale * LOG2E;
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
      B.tile_qpos[tile] = lane == 0 ? pos : std::min(B.tile_qpos[tile], pos);
      B.tile_lo[tile] = lane == 0 ? lo : std::max(B.tile_lo[tile], lo);
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d * N] = 0.f;
      B.qpos[r] = -1.f;
      B.lo[r] = 0.f;
    }
    B.m[r] = NEG;
    B.l[r] = 0.f;
  }
  std::fill(B.acc.begin(), B.acc.begin() + RP * D, 0.f);
  const int64_t row_len = a.KVH * D, v_offset = a.S * row_len, row_bytes = D * static_cast<int64_t>(sizeof(T));
  const int64_t j_begin = std::max<int64_t>(0, min_lo - first) / KB * KB;
  const int64_t j_end = std::min<int64_t>(nk, max_qp - first + 1);
  for (int64_t j0 = j_begin; j0 < j_end; j0 += KB) {
    const int64_t nb = std::min<int64_t>(KB, j_end - j0);
    float* const kb = B.kb.data();  // local: the stores below may alias the vectors' own pointers
    float* const vb = B.vb.data();
    const int64_t* const slots = a.kv_slots + k0 + j0;
    for (int64_t b = 0; b < nb; ++b) {  // the block's K and V rows in fp32 (D is a multiple of N)
      const T* krow = a.kv + slots[b] * row_len + h * D;
      const T* vrow = krow + v_offset;
      for (int64_t d = 0; d < D; d += N) {
        load_row(krow + d, N).store(kb + b * D + d);
        load_row(vrow + d, N).store(vb + b * D + d);
      }
    }
    std::fill(B.kb.begin() + nb * D, B.kb.begin() + (nb + NK) * D, 0.f);
    // while this block's scores are computed, the next block's K and V rows are fetched, a few keys per register
    // block (the cache is read from memory in a forward pass: the other layers evict it)
    const int64_t next0 = j0 + KB, next_nb = std::max<int64_t>(0, std::min<int64_t>(KB, j_end - next0));
    const int64_t n_blocks = (tiles + NT - 1) / NT * ((nb + NK - 1) / NK);
    int64_t issued = 0, block_i = 0;
    for (int64_t t0 = 0; t0 < tiles; t0 += NT)
      for (int64_t b0 = 0; b0 < nb; b0 += NK) {
        const int64_t upto = next_nb * ++block_i / n_blocks;
        for (; issued < upto; ++issued) {
          const int64_t slot = a.kv_slots[k0 + next0 + issued];
          const char* krow = reinterpret_cast<const char*>(a.kv + slot * row_len + h * D);
          const char* vrow = reinterpret_cast<const char*>(a.kv + v_offset + slot * row_len + h * D);
          for (int64_t line = 0; line < row_bytes; line += 64) {
            _mm_prefetch(krow + line, _MM_HINT_T0);
            _mm_prefetch(vrow + line, _MM_HINT_T0);
          }
        }
        by_tiles(tiles - t0, [&](auto nt) { score_block<decltype(nt)::value>(B, t0, b0, D, RP); });
      }
    // visibility, then the online softmax, lane-wise per tile
    const float kpos0 = static_cast<float>(first + j0);
    for (int64_t tile = 0; tile < tiles; ++tile) {
      V mx = V::set1(NEG);
      // every key of the block visible to every row of the tile (its padding rows' results are never read): the
      // scores stand as they are
      if (B.tile_lo[tile] <= first + j0 && first + j0 + nb - 1 <= B.tile_qpos[tile]) {
        V mx4[4] = {mx, mx, mx, mx};  // four chains: a max's latency, not one max per key in turn
        int64_t b = 0;
        for (; b + 4 <= nb; b += 4)
          for (int c = 0; c < 4; ++c) mx4[c] = V::max(mx4[c], V::load(B.st.data() + (b + c) * RP + tile * N));
        for (; b < nb; ++b) mx4[0] = V::max(mx4[0], V::load(B.st.data() + b * RP + tile * N));
        mx = V::max(V::max(mx4[0], mx4[1]), V::max(mx4[2], mx4[3]));
      } else {
        const V qpos = V::load(B.qpos.data() + tile * N), lo = V::load(B.lo.data() + tile * N);
        for (int64_t b = 0; b < nb; ++b) {
          float* s = B.st.data() + b * RP + tile * N;
          const V kp = V::set1(kpos0 + static_cast<float>(b));
          const V sv = V::select(V::visible(kp, qpos, lo), V::load(s), V::set1(NEG));
          mx = V::max(mx, sv);
          sv.store(s);
        }
      }
      const V m_old = V::load(B.m.data() + tile * N), m_new = V::max(m_old, mx);
      const V corr = softmax_exp<T>(m_old - m_new);
      // a row that has seen no key yet has m_new = NEG: subtracting at least -1e20 keeps its masked scores at ~NEG,
      // whose exponential is 0
      const V m_sub = V::max(m_new, V::set1(-1e20f));
      V sum = V::load(B.l.data() + tile * N) * corr;
      for (int64_t b = 0; b < nb; ++b) {
        float* s = B.st.data() + b * RP + tile * N;
        const V p = softmax_exp<T>(V::load(s) - m_sub);
        sum = sum + p;
        p.store(s);
      }
      m_new.store(B.m.data() + tile * N);
      sum.store(B.l.data() + tile * N);
      corr.store(B.c.data() + tile * N);
    }
    for (int64_t t0 = 0; t0 < tiles; t0 += NT)
      for (int64_t d0 = 0; d0 < D; d0 += ND)
        by_tiles(tiles - t0, [&](auto nt) { pv_block<decltype(nt)::value>(B, t0, d0, D, nb, RP); });
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t tile = r / N, lane = r % N;
    const int64_t i = (row0 + r) / G, g = (row0 + r) % G, head = h * G + g;
    float* o = a.out + ((q0 + i) * a.H + head) * D;
    const bool seen = B.l[r] > 0.f;
    const float inv = seen ? 1.f / B.l[r] : 0.f;
    const float* acc = B.acc.data() + tile * D * N + lane;
    for (int64_t d = 0; d < D; ++d) o[d] = acc[d * N] * inv;
    a.lse[(q0 + i) * a.H + head] = seen ? row_lse<T>(B.m[r], B.l[r]) : NEG;
  }
}

// Parts of a few rows per KV head (decodes): one task per part, over every KV head, so each block's token rows
// (all heads' K and V) are read whole and once; the rows stay apart and the head dims fill the vector lanes, so a
// key or value converted to fp32 in registers once serves every row of its GQA group. The next block's cache lines
// are prefetched while this block is computed, a share before each pass over its keys (all at once would stall on
// the core's few miss buffers).
// Dims go in units of 2N, a pair of vectors: a bf16 unit read as N 32-bit lanes holds each lane's odd dim in its top
// half (an fp32 once the bottom half is masked off) and its even dim in its bottom half (one shift), so a unit is one
// load and two cheap instructions, and the queries and accumulators keep the dims of a unit in that order, evens then
// odds (fp32 units: the dims in order).
//   qs    [KVH][R][D]      the rows' queries, scaled (see NATURAL), dims in unit order (row r: query r / G, head
//                          h * G + r % G)
//   sr    [R][SKB + N]     the block's scores of one head (-1e30 where not visible), then probabilities
//   acc   [KVH][R][D]      output accumulators, dims in unit order, rescaled by base^(m_old - m_new) when m moves
//   m, l  [KVH][R], [KVH][R][N]   each row's running maximum (up to LAZY below its highest score) and its sum of
//                          probabilities, lane-wise
// A score is a dot product over D summed across lanes.

// The 2N dims of a unit from p: evens and odds (bf16), or the two halves (fp32).
inline void load_unit(const at::BFloat16* p, V& even, V& odd) { V::load_bf16_pairs(p, even, odd); }
inline void load_unit(const float* p, V& lo, V& hi) {
  lo = V::load(p);
  hi = V::load(p + N);
}
// Scores of RR rows (queries q, fp32, scaled, rows D apart) against KS keys (rows `krow` of the cache, converted
// to fp32 in registers): s[rr * SR + k]. Each key unit serves the RR rows, each query vector the KS keys.
// keys per register block: RR x KS accumulators, a key unit and load_bf16_pairs' mask fit the registers (V8: 16,
// so 2 keys at RR = 4)
template <int RR>
constexpr int KS = N == 16 || RR <= 3 ? 4 : 2;
constexpr int KS_MAX = 4;
constexpr int RR_MAX = 4;            // rows per register block
constexpr int64_t SR = SKB + N;      // stride of a row's scores in sr

template <int RR, typename T>
inline void score_tile(const float* q, const T* const* krow, float* s, int64_t D) {
  constexpr int KS = f32k::KS<RR>;
  V acc[RR][KS];
  for (int rr = 0; rr < RR; ++rr)
    for (int k = 0; k < KS; ++k) acc[rr][k] = V::zero();
  for (int64_t d = 0; d < D; d += 2 * N) {
    for (int k = 0; k < KS; ++k) {
      V k0, k1;
      load_unit(krow[k] + d, k0, k1);
      for (int rr = 0; rr < RR; ++rr) {
        acc[rr][k] = V::fma(V::load(q + rr * D + d), k0, acc[rr][k]);
        acc[rr][k] = V::fma(V::load(q + rr * D + d + N), k1, acc[rr][k]);
      }
    }
  }
  for (int rr = 0; rr < RR; ++rr) {
    if constexpr (KS == 4) {
      _mm_storeu_ps(s + rr * SR, V::sum4(acc[rr][0], acc[rr][1], acc[rr][2], acc[rr][3]));
    } else {
      _mm_storel_pi(reinterpret_cast<__m64*>(s + rr * SR), V::sum4(acc[rr][0], acc[rr][1], acc[rr][0], acc[rr][1]));
    }
  }
}

// Scores of rows r0 .. r0 + RR - 1 against the block's nb keys (nb rounded up to KS: the last key repeats, and
// every score past nb is overwritten with NEG by the caller).
template <int RR, typename T>
inline void score_rows(const float* q, const T* const* krow, float* s, int64_t nb, int64_t D, PrefetchQueue& pf) {
  pf.issue(2 * ((nb + KS<RR> - 1) / KS<RR>));
  for (int64_t b = 0; b < nb; b += KS<RR>) score_tile<RR>(q, krow + b, s + b, D);
}

// P V of RB rows over CU units from dim d0: acc[rr] = acc[rr] * corr[rr] + sum over the nb keys of p[rr][b] * v[b],
// the RB x 2 CU accumulators in registers, each value unit converted once for the RB rows.
// units per pass: the accumulators, two value vectors, a probability and the mask of load_bf16_pairs fit the
// registers (V8: 16, at most 12 accumulators; a spilled one costs a store-to-load round trip per key)
constexpr int64_t cu_max(int64_t rb) { return N == 16 ? (rb <= 3 ? 4 : 3) : (rb == 1 ? 3 : rb == 2 ? 2 : 1); }

template <int RB, int CU, typename T>
inline void pv_units(float* acc, const T* const* vrow, int64_t d0, const float* p, const float* corr, int64_t nb,
                     int64_t D, int64_t pf_per_key, PrefetchQueue& pf) {
  V av[RB][2 * CU];
  for (int rr = 0; rr < RB; ++rr)
    for (int c = 0; c < 2 * CU; ++c) av[rr][c] = V::load(acc + rr * D + d0 + c * N) * V::set1(corr[rr]);
  pf.issue(pf_per_key * nb);
  for (int64_t b = 0; b < nb; ++b) {
    V v[2 * CU];
    for (int u = 0; u < CU; ++u) load_unit(vrow[b] + d0 + u * 2 * N, v[2 * u], v[2 * u + 1]);
    for (int rr = 0; rr < RB; ++rr) {
      const V pb = V::set1(p[rr * SR + b]);
      for (int c = 0; c < 2 * CU; ++c) av[rr][c] = V::fma(pb, v[c], av[rr][c]);
    }
  }
  for (int rr = 0; rr < RB; ++rr)
    for (int c = 0; c < 2 * CU; ++c) av[rr][c].store(acc + rr * D + d0 + c * N);
}

template <int RB, typename T>
inline void pv_rows(float* acc, const T* const* vrow, const float* p, const float* corr, int64_t nb, int64_t D,
                    int64_t pf_per_key, PrefetchQueue& pf) {
  constexpr int64_t CU = cu_max(RB);
  for (int64_t d0 = 0; d0 < D; d0 += CU * 2 * N) {
    switch (std::min<int64_t>(CU, (D - d0) / (2 * N))) {
      case 1: pv_units<RB, 1>(acc, vrow, d0, p, corr, nb, D, pf_per_key, pf); break;
      case 2: if constexpr (CU >= 2) pv_units<RB, 2>(acc, vrow, d0, p, corr, nb, D, pf_per_key, pf); break;
      case 3: if constexpr (CU >= 3) pv_units<RB, 3>(acc, vrow, d0, p, corr, nb, D, pf_per_key, pf); break;
      default: if constexpr (CU >= 4) pv_units<RB, 4>(acc, vrow, d0, p, corr, nb, D, pf_per_key, pf);
    }
  }
}

// Whether run_small takes head dim D: whole units.
inline bool small_takes(int64_t D) { return D % (2 * N) == 0; }

template <typename T>
void run_small(int64_t part, SmallBuffers& B, const Args<T>& a) {
  const int64_t G = a.H / a.KVH, D = a.D, KVH = a.KVH;
  const int64_t q0 = a.q_ptr[part], R = (a.q_ptr[part + 1] - q0) * G;
  const int64_t k0 = a.kv_ptr[part], nk = a.kv_ptr[part + 1] - k0, first = a.kv_start[part];
  B.reserve(KVH * R, D);
  float *qs = B.qs.data(), *acc = B.acc.data(), *m = B.m.data(), *l = B.l.data(), *sr = B.sr.data();
  float* corr = B.corr.data();
  int64_t max_qp = -1, min_lo = std::numeric_limits<int64_t>::max(), max_lo = 0, min_qp = 0;
  const float qscale = NATURAL<T> ? a.scale : a.scale * LOG2E;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t row = a.q_rows[q0 + r / G];
    for (int64_t h = 0; h < KVH; ++h) {
      const T* src = a.q + row * a.QS + (h * G + r % G) * D;
      float* dst = qs + (h * R + r) * D;
      for (int64_t d = 0; d < D; d += 2 * N) {  // in unit order
        V lo, hi;
        load_unit(src + d, lo, hi);
        (lo * V::set1(qscale)).store(dst + d);
        (hi * V::set1(qscale)).store(dst + d + N);
      }
    }
    const int64_t pos = a.q_pos[row], lo = a.window > 0 ? pos - a.window + 1 : 0;
    B.qpos[r] = static_cast<float>(pos);
    B.lo[r] = static_cast<float>(lo);
    max_qp = std::max(max_qp, pos);
    min_qp = r == 0 ? pos : std::min(min_qp, pos);
    min_lo = std::min(min_lo, lo);
    max_lo = std::max(max_lo, lo);
  }
  std::fill(m, m + KVH * R, NEG);
  std::fill(l, l + KVH * R * N, 0.f);  // each row's sum, lane-wise
  std::fill(acc, acc + KVH * R * D, 0.f);
  alignas(64) float iota[N];
  for (int64_t i = 0; i < N; ++i) iota[i] = static_cast<float>(i);
  const V lane = V::load(iota);
  const int64_t row_len = a.KVH * D, v_offset = a.S * row_len;
  const int64_t row_bytes = row_len * static_cast<int64_t>(sizeof(T));
  const int64_t j_begin = std::max<int64_t>(0, min_lo - first) / SKB * SKB;
  const int64_t j_end = std::min<int64_t>(nk, max_qp - first + 1);
  B.pf.lines = (row_bytes + 63) / 64 + (row_bytes % 64 != 0);  // a row not starting at a line may end in one more
  auto queue_block = [&](int64_t j, int64_t n_keys) {  // every head's K and V rows of keys j .. j + n_keys - 1
    PrefetchQueue& pf = B.pf;
    pf.n_rows = 2 * n_keys;
    pf.row = pf.line = 0;
    for (int64_t b = 0; b < n_keys; ++b) {
      pf.rows[2 * b] = reinterpret_cast<const char*>(a.kv + a.kv_slots[k0 + j + b] * row_len);
      pf.rows[2 * b + 1] = pf.rows[2 * b] + v_offset * static_cast<int64_t>(sizeof(T));
    }
  };
  if (j_begin < j_end) {  // the first block: nothing to overlap, one burst
    queue_block(j_begin, std::min(SKB, j_end - j_begin));
    B.pf.issue_all();
  }
  int64_t pv_passes = 0;  // passes of P V over the dims, every row block of a head
  for (int64_t r0 = 0; r0 < R; r0 += RR_MAX) {
    const int64_t cu = cu_max(std::min<int64_t>(RR_MAX, R - r0));
    pv_passes += (D / (2 * N) + cu - 1) / cu;
  }
  for (int64_t j0 = j_begin; j0 < j_end; j0 += SKB) {
    const int64_t nb = std::min<int64_t>(SKB, j_end - j0), nbv = (nb + N - 1) / N * N;
    B.pf.issue_all();  // what the last block's steps left
    queue_block(j0 + SKB, std::max<int64_t>(0, std::min<int64_t>(SKB, j_end - j0 - SKB)));
    // the P V steps of the block (heads x passes x keys) share the prefetches the scores leave
    const int64_t pv_steps = KVH * pv_passes * nb;
    const int64_t pf_per_key = (B.pf.n_rows * B.pf.lines + pv_steps - 1) / pv_steps;
    const float kpos0 = static_cast<float>(first + j0);
    // every row sees every key of the block: no visibility masks
    const bool all_visible = max_lo <= first + j0 && first + j0 + nb - 1 <= min_qp;
    for (int64_t h = 0; h < KVH; ++h) {
      const T* krow[SKB + KS_MAX];
      const T* vrow[SKB];
      for (int64_t b = 0; b < nb; ++b) {  // this head's K and V rows
        const int64_t slot = a.kv_slots[k0 + j0 + b];
        krow[b] = a.kv + slot * row_len + h * D;
        vrow[b] = a.kv + v_offset + slot * row_len + h * D;
      }
      for (int64_t b = nb; b < nb + KS_MAX; ++b) krow[b] = krow[nb - 1];
      for (int64_t r0 = 0; r0 < R; r0 += RR_MAX) {
        const float* q = qs + (h * R + r0) * D;
        switch (std::min<int64_t>(RR_MAX, R - r0)) {
          case 1: score_rows<1>(q, krow, sr + r0 * SR, nb, D, B.pf); break;
          case 2: score_rows<2>(q, krow, sr + r0 * SR, nb, D, B.pf); break;
          case 3: score_rows<3>(q, krow, sr + r0 * SR, nb, D, B.pf); break;
          default: score_rows<4>(q, krow, sr + r0 * SR, nb, D, B.pf);
        }
      }
      for (int64_t r = 0; r < R; ++r) {  // the online softmax: probabilities in sr, the rescaling in corr
        float* s = sr + r * SR;
        for (int64_t b = nb; b < nbv; ++b) s[b] = NEG;
        const int64_t hr = h * R + r;
        V mx = V::set1(NEG);
        if (all_visible) {
          for (int64_t b = 0; b < nbv; b += N) mx = V::max(mx, V::load(s + b));
        } else {
          const V qpos = V::set1(B.qpos[r]), lo = V::set1(B.lo[r]);
          for (int64_t b = 0; b < nbv; b += N) {  // visibility
            const V kp = V::set1(kpos0 + static_cast<float>(b)) + lane;
            const V sv = V::select(V::visible(kp, qpos, lo), V::load(s + b), V::set1(NEG));
            mx = V::max(mx, sv);
            sv.store(s + b);
          }
        }
        float* lr = l + hr * N;
        // The running maximum m moves only when a score passes it by more than LAZY (until then probabilities reach
        // up to base^LAZY, far from fp32's range): most blocks need no horizontal maximum and no rescaling, and the
        // sum stays lane-wise. The first visible block sets m.
        if (m[hr] > NEG && !V::any(V::less(V::set1(m[hr] + LAZY), mx))) {
          corr[r] = 1.f;
          V sum = V::load(lr);
          for (int64_t b = 0; b < nbv; b += N) {
            const V p = softmax_exp<T>(V::load(s + b) - V::set1(m[hr]));
            sum = sum + p;
            p.store(s + b);
          }
          sum.store(lr);
          continue;
        }
        const float bmax = mx.max();
        if (bmax <= NEG) {  // nothing visible to this row yet: no change
          for (int64_t b = 0; b < nbv; b += N) V::zero().store(s + b);
          corr[r] = 1.f;
          continue;
        }
        const float m_new = std::max(m[hr], bmax);
        corr[r] = NATURAL<T> ? std::exp(m[hr] - m_new) : std::exp2(m[hr] - m_new);  // 0 for the first block
        V sum = V::load(lr) * V::set1(corr[r]);
        for (int64_t b = 0; b < nbv; b += N) {
          const V p = softmax_exp<T>(V::load(s + b) - V::set1(m_new));
          sum = sum + p;
          p.store(s + b);
        }
        m[hr] = m_new;
        sum.store(lr);
      }
      for (int64_t r0 = 0; r0 < R; r0 += RR_MAX) {
        float* ar = acc + (h * R + r0) * D;
        const float* p = sr + r0 * SR;
        switch (std::min<int64_t>(RR_MAX, R - r0)) {
          case 1: pv_rows<1>(ar, vrow, p, corr + r0, nb, D, pf_per_key, B.pf); break;
          case 2: pv_rows<2>(ar, vrow, p, corr + r0, nb, D, pf_per_key, B.pf); break;
          case 3: pv_rows<3>(ar, vrow, p, corr + r0, nb, D, pf_per_key, B.pf); break;
          default: pv_rows<4>(ar, vrow, p, corr + r0, nb, D, pf_per_key, B.pf);
        }
      }
    }
  }
  for (int64_t h = 0; h < KVH; ++h) {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t hr = h * R + r, head = h * G + r % G;
      float* o = a.out + ((q0 + r / G) * a.H + head) * D;
      const float lsum = V::load(l + hr * N).sum();
      const bool seen = lsum > 0.f;
      const float inv = seen ? 1.f / lsum : 0.f;
      const float* ar = acc + hr * D;
      for (int64_t d0 = 0; d0 < D; d0 += 2 * N)  // from unit order: bf16 units hold the even dims, then the odd
        for (int64_t i = 0; i < N; ++i) {
          if constexpr (std::is_same_v<T, float>) {
            o[d0 + i] = ar[d0 + i] * inv;
            o[d0 + N + i] = ar[d0 + N + i] * inv;
          } else {
            o[d0 + 2 * i] = ar[d0 + i] * inv;
            o[d0 + 2 * i + 1] = ar[d0 + N + i] * inv;
          }
        }
      a.lse[(q0 + r / G) * a.H + head] = seen ? row_lse<T>(m[hr], lsum) : NEG;
    }
  }
}

}  // namespace f32k

// Every part: those of at most `small_rows` rows per KV head in run_small, one task each; the others split
// into tasks of at most TASK_ROWS rows for run_task. Returns whether head_dim suits the kernels (a multiple of ND
// and of the vector width); else nothing was computed.
template <typename T>
bool f32_attention(const T* q, const T* kv, const int64_t* q_ptr, const int64_t* q_rows, const int64_t* kv_ptr,
                   const int64_t* kv_slots, const int64_t* kv_start, const int64_t* q_pos, int64_t num_parts,
                   int64_t H, int64_t QS, int64_t KVH, int64_t D, int64_t S, int64_t window, float scale, float* out,
                   float* lse, int64_t small_rows) {
  using namespace f32k;
  if (D % ND != 0 || D % N != 0) return false;
  struct Task {
    int64_t part, head, row0, rows;
    bool small;  // run_small: every KV head of the part
  };
  const int64_t G = H / KVH;
  std::vector<Task> tasks;
  for (int64_t p = 0; p < num_parts; ++p) {
    const int64_t R = (q_ptr[p + 1] - q_ptr[p]) * G;
    if (R == 0) continue;
    if (R <= small_rows && small_takes(D)) {
      tasks.push_back({p, 0, 0, R * KVH, true});
      continue;
    }
    // tasks of equal size, whole register blocks (but the last), at most TASK_ROWS rows: 192 rows are 2 x 96
    const int64_t n = (R + TASK_ROWS - 1) / TASK_ROWS, whole = NT * N;
    const int64_t step = std::min(TASK_ROWS, ((R + n - 1) / n + whole - 1) / whole * whole);
    for (int64_t h = 0; h < KVH; ++h)
      for (int64_t r0 = 0; r0 < R; r0 += step) tasks.push_back({p, h, r0, std::min(step, R - r0), false});
  }
  auto work = [&](const Task& t) { return t.rows * (kv_ptr[t.part + 1] - kv_ptr[t.part]); };
  std::sort(tasks.begin(), tasks.end(), [&](const Task& x, const Task& y) { return work(x) > work(y); });
  const Args<T> args{q, kv, q_ptr, q_rows, kv_ptr, kv_slots, kv_start, q_pos, H, QS, KVH, D, S, window, scale, out, lse};
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
#pragma omp parallel
  {
    Buffers B;
    B.reserve(D);
    SmallBuffers SB;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_tasks; ++i) {
      const Task& t = tasks[i];
      if (t.small) run_small(t.part, SB, args);
      else run_task(t.part, t.head, t.row0, t.rows, B, args);
    }
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
