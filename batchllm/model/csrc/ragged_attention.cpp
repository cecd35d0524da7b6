// Ragged paged attention for CPU: attention parts read straight from the paged KV cache.
//
// A part is a set of query rows against one KV segment (consecutive positions kv_start .. kv_start + len - 1 whose
// K/V live at the given flat cache slots). Each task streams its part's keys and keeps an online softmax per query
// row (flash-attention style), so K/V are never gathered or padded. Three implementations:
//  - bf16 with head_dim % 32 == 0 on a CPU with AVX512-BF16 (namespace bf16k): every part, from single decodes to a
//    shared prefix attended by thousands of queries, as vdpbf16ps matrix products with fp32 accumulation;
//  - bf16 on the AVX2 and AVX-512F paths (attention_f32.cpp): fp32 arithmetic in vectors, every part;
//  - otherwise a portable fp32 loop (SmallParts), which the engine uses in fp32 for parts of few query rows.
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

#include <ATen/ATen.h>

#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
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

// Per-thread work space of the scalar kernel; run(p, h) computes part p for KV head h (all its query rows).
template <typename scalar_t>
struct SmallParts {
  const scalar_t *q, *kv;
  const int64_t *q_ptr, *q_rows, *kv_ptr, *kv_slots, *kv_start, *q_pos;
  int64_t H, QS, KVH, D, S, window;
  float scale;
  float *out, *lse;
  std::vector<float> qf, acc, m, l, kblk, kt, vblk, sc;
  std::vector<int64_t> qp;

  void run(int64_t p, int64_t h) {
    const int64_t G = H / KVH;
    const int64_t v_offset = S * KVH * D;  // V half of the cache
    kblk.resize(KEY_BLOCK * D);
    kt.resize(D * KEY_BLOCK);
    vblk.resize(KEY_BLOCK * D);
    sc.resize(KEY_BLOCK);
    const int64_t q0 = q_ptr[p], nq = q_ptr[p + 1] - q0;
    const int64_t k0 = kv_ptr[p], nk = kv_ptr[p + 1] - k0;
    const int64_t R = nq * G;  // rows: (query, head in group)
    if (R == 0) return;
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
        load_row(q + row * QS + (h * G + g) * D, dst, D);
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
};

// The portable loop over every part (where the vector kernels are not built, or head_dim does not suit them).
template <typename scalar_t>
void ragged_kernel(const scalar_t* q, const scalar_t* kv, const int64_t* q_ptr, const int64_t* q_rows,
                   const int64_t* kv_ptr, const int64_t* kv_slots, const int64_t* kv_start, const int64_t* q_pos,
                   int64_t num_parts, int64_t H, int64_t QS, int64_t KVH, int64_t D, int64_t S, int64_t window, float scale,
                   float* out, float* lse) {
  const int64_t n_tasks = num_parts * KVH;
  if (n_tasks == 0) return;
#pragma omp parallel
  {
    SmallParts<scalar_t> work{q, kv, q_ptr, q_rows, kv_ptr, kv_slots, kv_start, q_pos, H, QS, KVH, D, S, window, scale,
                              out, lse};
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) work.run(task / KVH, task % KVH);
  }
}

}  // namespace

#if defined(BATCHLLM_HAS_VEC)
// attention_f32.cpp: every part with fp32 arithmetic in vectors (false where head_dim does not suit it).
template <typename T>
bool f32_attention(const T* q, const T* kv, const int64_t* q_ptr, const int64_t* q_rows, const int64_t* kv_ptr,
                   const int64_t* kv_slots, const int64_t* kv_start, const int64_t* q_pos, int64_t num_parts,
                   int64_t H, int64_t QS, int64_t KVH, int64_t D, int64_t S, int64_t window, float scale, float* out,
                   float* lse, int64_t small_rows);
#endif

namespace {

// Parts of at most this many rows per KV head run in attention_f32.cpp's decode kernel (run_small).
constexpr int64_t F32_SMALL_ROWS = 8;


// ---------------------------------------------------------------------------------------------------------------
// bf16 kernel (AVX512-BF16): any number of queries per part, head_dim a multiple of 32.
//
// A task is (part, kv head, a slice of at most TASK_ROWS rows); a row is one (query, head of the GQA group).
// Scores are computed transposed, 16 rows in the 16 fp32 lanes of a register, so the keys are read straight from the
// cache rows (one 32-bit broadcast per pair of dims) and the online softmax is lane-wise (no horizontal reductions):
//
//   Qp    [tiles][D/2][16]    query pairs (q[2p], q[2p+1]) of 16 rows: one register per pair index p
//   St    [KB][rows]          fp32 scores (base 2: scaled by log2 e) of one key block, -1e30 where not visible
//   Pp    [KB/2][rows]        probabilities as bf16 pairs (p[2j], p[2j+1]) of each row
//   Vp    [KB/2][D]           values as bf16 pairs (v[2j][d], v[2j+1][d]), dims in the order `interleave` leaves
//   acc   [rows][D]           fp32 output accumulators (dims as in Vp), rescaled by 2^(m_old - m_new) per block
//
// vdpbf16ps sums the two products of a pair into one fp32 lane: QK^T reduces over dim pairs, PV over key pairs.
#ifdef BATCHLLM_HAS_BF16_KERNEL

namespace bf16k {

constexpr int64_t KB = 256;         // keys per block (fewer passes over the accumulators: 1.1-1.4x over 32)
constexpr int64_t SMALL_TASK_KB = 32;  // keys per block in tasks of at most 3 row tiles
constexpr int64_t SMALL_MAX_ROWS = 8;  // run_small handles parts of at most this many rows per KV head
constexpr int64_t SMALL_KB = 16;  // keys per block in run_small
constexpr int64_t TASK_ROWS = 256;  // rows per task (bounds the per-thread buffers to L2)

inline __m512 dp(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }

inline __m512i bcast_pair(const at::BFloat16* row, int64_t p) {
  return _mm512_set1_epi32(reinterpret_cast<const int32_t*>(row)[p]);
}

template <int DEGREE = 6>
inline __m512 exp2_512(__m512 x) { return vec::exp2<vec::V16, DEGREE>(vec::V16(x)).v; }
inline __m512 exp512(__m512 x) { return vec::exp<vec::V16>(vec::V16(x)).v; }
constexpr float LN2 = 0.69314718f, LOG2E = 1.44269504f;

// Tasks of at most this many rows run in the scalar kernel (env BATCHLLM_SMALL_ROWS overrides, for measuring).
inline int64_t small_rows_limit() {
  static const int64_t limit = [] {
    const char* env = std::getenv("BATCHLLM_SMALL_ROWS");
    return std::min<int64_t>(env ? std::atoll(env) : int64_t{6}, 8);
  }();
  return limit;
}

// Everything a task reads (and the outputs it writes), as passed to `attention`.
struct Args {
  const at::BFloat16 *q, *kv;
  const int64_t *q_ptr, *q_rows, *kv_ptr, *kv_slots, *kv_start, *q_pos;
  int64_t H, QS, KVH, D, S, window;
  float scale;
  const at::BFloat16* zero_row;  // D zeros: stands in for the keys past a block's end
  float *out, *lse;
};

struct Task {
  int64_t part, head, row0, nrows;
};

template <typename T>
inline void grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
}

// Per-thread work space of one call, sized by what the call's tasks use: run_small acc, m, l and pp; run_task all of
// it (about 0.6 MiB with head_dim 64, within a core's L2).
struct Buffers {
  std::vector<int32_t> qp, pp, vp, qpos, lo;
  std::vector<float> st, acc, m, l, c, bmax;
  std::vector<uint8_t> active;
  std::vector<int32_t> tmax, tmin, tlo;
  std::vector<const char*> pf;  // queued cache lines of the next key block: pf[pf_i .. pf_n) not yet prefetched
  int64_t pf_n = 0, pf_i = 0;
  void reserve(int64_t D, int64_t KVH, bool tasks) {
    const int64_t small_rows = KVH * SMALL_MAX_ROWS;  // run_small: its rows for every KV head
    const int64_t R = tasks ? std::max(TASK_ROWS, small_rows) : small_rows;
    grow(acc, R * D);
    grow(m, R);
    grow(l, R);
    grow(pp, tasks ? KB / 2 * R + 16 * 8 : SMALL_MAX_ROWS * 8);
    grow(pf, std::max(KB * 2 * ((D * 2 + 63) / 64), SMALL_KB * 2 * ((KVH * D * 2 + 63) / 64)));
    if (!tasks) return;
    grow(qp, R * D / 2);
    grow(vp, KB / 2 * D);
    grow(qpos, R);
    grow(lo, R);
    grow(st, KB * R);
    grow(c, R);
    grow(bmax, R);
    grow(active, R / 16);
    grow(tmax, R / 16);
    grow(tmin, R / 16);
    grow(tlo, R / 16);
  }
};

// Interleave two rows of 32 bf16 into pairs with in-lane unpacks: per 128-bit lane L, lo holds the pairs of dims
// 8L .. 8L + 3 and hi those of 8L + 4 .. 8L + 7. P V accumulators fed this way hold a row's dims permuted (position
// 32c + 16h + lane <-> dim 32c + 8 (lane / 4) + 4h + lane % 4); store_row undoes it.
inline void interleave(__m512i a, __m512i b, __m512i& lo, __m512i& hi) {
  lo = _mm512_unpacklo_epi16(a, b);
  hi = _mm512_unpackhi_epi16(a, b);
}

// o[dim] = acc[position] * inv over a row of D dims, undoing the permutation left by `interleave`.
inline void store_row(float* o, const float* acc, int64_t D, float inv) {
  for (int64_t c = 0; c < D / 32; ++c)
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t lane = 0; lane < 16; ++lane) o[32 * c + 8 * (lane / 4) + 4 * h + lane % 4] = acc[32 * c + 16 * h + lane] * inv;
}

// Queue the cache lines of one key's K and V (n values each from k and v) for prefetch_queued.
inline void queue_row(Buffers& B, const at::BFloat16* k, const at::BFloat16* v, int64_t n) {
  const char* kc = reinterpret_cast<const char*>(k);
  const char* vc = reinterpret_cast<const char*>(v);
  for (int64_t off = 0; off < n * 2; off += 64) {
    B.pf[B.pf_n++] = kc + off;
    B.pf[B.pf_n++] = vc + off;
  }
}

// Prefetch up to n more of the queued lines.
inline void prefetch_queued(Buffers& B, int64_t n) {
  for (const int64_t end = std::min(B.pf_n, B.pf_i + n); B.pf_i < end; ++B.pf_i) _mm_prefetch(B.pf[B.pf_i], _MM_HINT_T0);
}

// Row pointers of the n keys j0 .. j0 + n - 1 of a part (zero rows past j_end) for head h, and a prefetch of the
// next n keys' rows, so the fetch overlaps this block's work. SPREAD (tasks of few row tiles, whose every key comes
// from memory once and is soon used up): the lines are only queued, and score_tiles prefetches one per step of its
// inner loop; a burst at the block's start stalls on the CPU's few miss buffers (spreading it was 1.15-1.5x faster
// on decodes against a shared prefix, cold). Otherwise every tile reads the keys and the burst is soon absorbed.
template <bool SPREAD>
inline void block_rows(const Args& a, Buffers& B, int64_t h, int64_t k0, int64_t j0, int64_t j_end, int64_t n,
                       const at::BFloat16** krow, const at::BFloat16** vrow) {
  const int64_t row = a.KVH * a.D, v_offset = a.S * row;
  for (int64_t b = 0; b < n; ++b) {
    if (j0 + b < j_end) {
      const int64_t slot = a.kv_slots[k0 + j0 + b];
      krow[b] = a.kv + slot * row + h * a.D;
      vrow[b] = a.kv + v_offset + slot * row + h * a.D;
    } else {
      krow[b] = vrow[b] = a.zero_row;
    }
  }
  B.pf_n = B.pf_i = 0;
  for (int64_t b = 0; b < n && j0 + n + b < j_end; ++b) {
    const int64_t slot = a.kv_slots[k0 + j0 + n + b];
    queue_row(B, a.kv + slot * row + h * a.D, a.kv + v_offset + slot * row + h * a.D, a.D);
    if (!SPREAD) prefetch_queued(B, B.pf_n);
  }
}

// Scores of NT consecutive row tiles (16 rows each) against the block's keys, 8 keys at a time: NT x 8 accumulators,
// so each broadcast key pair feeds NT products. Writes st[key][row], scaled, NEG where the key is not visible.
template <int NT, bool SPREAD>
inline void score_tiles(Buffers& B, int64_t tile, int64_t P2, const at::BFloat16* const* krow, int64_t nb,
                        int32_t kpos0, int64_t RP, float scale) {
  int32_t tmax = B.tmax[tile], tmin = B.tmin[tile], tlo = B.tlo[tile];
  for (int u = 1; u < NT; ++u) {
    tmax = std::max(tmax, B.tmax[tile + u]);
    tmin = std::min(tmin, B.tmin[tile + u]);
    tlo = std::max(tlo, B.tlo[tile + u]);
  }
  const __m512 vscale = _mm512_set1_ps(scale * LOG2E);  // scores in base 2: the softmax uses 2^x
  const char* const* pf = B.pf.data();  // the prefetch queue in locals: B's fields would go through memory each step
  int64_t pf_i = B.pf_i;
  const int64_t pf_n = B.pf_n;
  float* st = B.st.data();
  __m512 mx[NT];  // running max of each tile's stored scores: the block max the softmax needs
  for (int u = 0; u < NT; ++u) mx[u] = _mm512_set1_ps(NEG);
  const int64_t b_end = std::min<int64_t>(KB, (nb + 7) / 8 * 8);  // the softmax reads keys < nb + 1 only
  for (int64_t b0 = 0; b0 < b_end; b0 += 8) {
    __m512 sc[NT][8];
    const bool skip = b0 >= nb || kpos0 + b0 > tmax;  // every key here is past every row (or padding)
    for (int u = 0; u < NT; ++u)
      for (int k = 0; k < 8; ++k) sc[u][k] = _mm512_setzero_ps();
    if (!skip) {
      const int32_t* qt = B.qp.data() + tile * P2 * 16;
      for (int64_t p = 0; p < P2; ++p) {
        if (SPREAD && pf_i < pf_n) _mm_prefetch(pf[pf_i++], _MM_HINT_T0);
        __m512i qv[NT];
        for (int u = 0; u < NT; ++u) qv[u] = _mm512_loadu_si512(qt + u * P2 * 16 + p * 16);
        for (int k = 0; k < 8; ++k) {
          const __m512i kb = bcast_pair(krow[b0 + k], p);
          for (int u = 0; u < NT; ++u) sc[u][k] = dp(sc[u][k], qv[u], kb);
        }
      }
    }
    const int32_t k_first = kpos0 + static_cast<int32_t>(b0), k_last = k_first + 7;
    if (!skip && b0 + 8 <= nb && k_last <= tmin && k_first >= tlo) {  // every row sees all 8 keys: no mask
      for (int u = 0; u < NT; ++u)
        for (int k = 0; k < 8; ++k) {
          const __m512 v = _mm512_mul_ps(sc[u][k], vscale);
          mx[u] = _mm512_max_ps(mx[u], v);
          _mm512_storeu_ps(st + (b0 + k) * RP + (tile + u) * 16, v);
        }
      continue;
    }
    for (int u = 0; u < NT; ++u) {
      const int64_t lane0 = (tile + u) * 16;
      const __m512i qpos = _mm512_loadu_si512(B.qpos.data() + lane0);
      const __m512i lov = _mm512_loadu_si512(B.lo.data() + lane0);
      for (int k = 0; k < 8; ++k) {
        const __m512i kpv = _mm512_set1_epi32(kpos0 + static_cast<int32_t>(b0) + k);
        __mmask16 vis = _mm512_cmp_epi32_mask(kpv, qpos, _MM_CMPINT_LE) & _mm512_cmp_epi32_mask(lov, kpv, _MM_CMPINT_LE);
        if (skip || b0 + k >= nb) vis = 0;
        const __m512 v = _mm512_mask_blend_ps(vis, _mm512_set1_ps(NEG), _mm512_mul_ps(sc[u][k], vscale));
        mx[u] = _mm512_max_ps(mx[u], v);
        _mm512_storeu_ps(st + (b0 + k) * RP + lane0, v);
      }
    }
  }
  for (int u = 0; u < NT; ++u) _mm512_storeu_ps(B.bmax.data() + (tile + u) * 16, mx[u]);
  B.pf_i = pf_i;
}

// acc[r0 .. r0 + NRW)[d0 .. d0 + 16 NC) = acc * corr + P V over the block's key pairs: NRW x NC accumulators stay in
// registers, so each V load feeds NRW products and each broadcast probability pair NC.
template <int NRW, int NC>
inline void pv_block(Buffers& B, int64_t r0, int64_t d0, int64_t D, int64_t npairs, int64_t RP) {
  __m512 a[NRW][NC];
  for (int rr = 0; rr < NRW; ++rr) {
    const __m512 cr = _mm512_set1_ps(B.c[r0 + rr]);
    const float* arow = B.acc.data() + (r0 + rr) * D + d0;
    for (int c = 0; c < NC; ++c) a[rr][c] = _mm512_mul_ps(_mm512_loadu_ps(arow + 16 * c), cr);
  }
  for (int64_t j = 0; j < npairs; ++j) {
    __m512i v[NC];
    for (int c = 0; c < NC; ++c) v[c] = _mm512_loadu_si512(B.vp.data() + j * D + d0 + 16 * c);
    const int32_t* pj = B.pp.data() + j * RP + r0;
    for (int rr = 0; rr < NRW; ++rr) {
      const __m512i pr = _mm512_set1_epi32(pj[rr]);
      for (int c = 0; c < NC; ++c) a[rr][c] = dp(a[rr][c], v[c], pr);
    }
  }
  for (int rr = 0; rr < NRW; ++rr) {
    float* arow = B.acc.data() + (r0 + rr) * D + d0;
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(arow + 16 * c, a[rr][c]);
  }
}

// SPREAD: a task of at most 3 row tiles, whose key blocks are read once, straight from memory (see block_rows).
template <bool SPREAD>
__attribute__((always_inline)) inline void run_task(const Task& t, Buffers& B, const Args& a) {  // inlined: 2-4% faster
  const auto& [q, kv, q_ptr, q_rows, kv_ptr, kv_slots, kv_start, q_pos, H, QS, KVH, D, S, window, scale, zero_row, out,
               lse] = a;
  const int64_t G = H / KVH, P2 = D / 2, h = t.head;
  const int64_t q0 = q_ptr[t.part], k0 = kv_ptr[t.part], nk = kv_ptr[t.part + 1] - k0;
  const int64_t first = kv_start[t.part];
  const int64_t R = t.nrows, tiles = (R + 15) / 16, RP = tiles * 16;
  constexpr int32_t NOPOS = std::numeric_limits<int32_t>::min() / 2;

  // Queries as pairs, transposed into lanes; positions and the lowest visible key position of every row.
  int64_t max_qp = -1, min_lo = std::numeric_limits<int64_t>::max();
  for (int64_t r = 0; r < RP; ++r) {
    const int64_t lane = r % 16, tile = r / 16;
    int32_t* dst = B.qp.data() + tile * P2 * 16 + lane;
    if (r < R) {
      const int64_t i = (t.row0 + r) / G, g = (t.row0 + r) % G;
      const int64_t row = q_rows[q0 + i];
      const int32_t* src = reinterpret_cast<const int32_t*>(q + row * QS + (h * G + g) * D);
      for (int64_t p = 0; p < P2; ++p) dst[p * 16] = src[p];
      const int64_t pos = q_pos[row];
      const int64_t lo = window > 0 ? pos - window + 1 : 0;
      B.qpos[r] = static_cast<int32_t>(pos);
      B.lo[r] = static_cast<int32_t>(lo);
      max_qp = std::max(max_qp, pos);
      min_lo = std::min(min_lo, lo);
    } else {
      for (int64_t p = 0; p < P2; ++p) dst[p * 16] = 0;
      B.qpos[r] = NOPOS;
      B.lo[r] = 0;
    }
    B.m[r] = NEG;
    B.l[r] = 0.f;
  }
  std::fill(B.acc.begin(), B.acc.begin() + RP * D, 0.f);

  // Key blocks of KB keys in tasks of many row tiles (fewer passes over their accumulators), of SMALL_TASK_KB in
  // tasks of a few (decodes against a shared prefix), whose block buffers then stay in L1.
  const int64_t kb = SPREAD ? SMALL_TASK_KB : KB;
  const int64_t j_begin = std::max<int64_t>(0, min_lo - first) / kb * kb;
  const int64_t j_end = std::min<int64_t>(nk, max_qp - first + 1);
  const at::BFloat16* krow[KB];
  const at::BFloat16* vrow[KB];
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kb) {
    const int64_t nb = std::min<int64_t>(kb, j_end - j0);
    block_rows<SPREAD>(a, B, h, k0, j0, j_end, kb, krow, vrow);
    // V as key pairs.
    const int64_t npairs = (nb + 1) / 2;
    for (int64_t j = 0; j < npairs; ++j) {
      for (int64_t d = 0; d < D; d += 32) {
        __m512i lo, hi;
        interleave(_mm512_loadu_si512(vrow[2 * j] + d), _mm512_loadu_si512(vrow[2 * j + 1] + d), lo, hi);
        _mm512_storeu_si512(B.vp.data() + j * D + d, lo);
        _mm512_storeu_si512(B.vp.data() + j * D + d + 16, hi);
      }
    }
    const int32_t kpos0 = static_cast<int32_t>(first + j0);
    // Which row tiles see this block: some row's [lo, qpos] meets [kpos0, kpos0 + nb - 1].
    for (int64_t tile = 0; tile < tiles; ++tile) {
      int32_t tmax = NOPOS, tlo = std::numeric_limits<int32_t>::max();
      int32_t tmin = std::numeric_limits<int32_t>::max(), tlo_max = std::numeric_limits<int32_t>::min();
      for (int64_t r = tile * 16; r < std::min<int64_t>(R, tile * 16 + 16); ++r) {
        tmax = std::max(tmax, B.qpos[r]);
        tlo = std::min(tlo, B.lo[r]);
        tmin = std::min(tmin, B.qpos[r]);
        tlo_max = std::max(tlo_max, B.lo[r]);
      }
      B.active[tile] = tmax >= kpos0 && tlo <= kpos0 + nb - 1;
      B.tmax[tile] = tmax;
      B.tmin[tile] = tmin;  // every real row of the tile sees keys at [tlo_max, tmin]
      B.tlo[tile] = tlo_max;
    }
    // Scores: up to three active tiles (48 rows) x 8 keys at a time (see score_tiles).
    for (int64_t tile = 0; tile < tiles;) {
      int64_t run = 0;  // consecutive active tiles from here
      while (run < 3 && tile + run < tiles && B.active[tile + run]) ++run;
      if (run == 0) {
        ++tile;
        continue;
      }
      if (run == 3) score_tiles<3, SPREAD>(B, tile, P2, krow, nb, kpos0, RP, scale);
      if (run == 2) score_tiles<2, SPREAD>(B, tile, P2, krow, nb, kpos0, RP, scale);
      if (run == 1) score_tiles<1, SPREAD>(B, tile, P2, krow, nb, kpos0, RP, scale);
      tile += run;
    }
    if (SPREAD) prefetch_queued(B, B.pf_n);
    for (int64_t tile = 0; tile < tiles; ++tile) {
      if (!B.active[tile]) continue;
      const float* st = B.st.data();
      // Online softmax, lane-wise over the block's keys.
      const __m512 mx = _mm512_loadu_ps(B.bmax.data() + tile * 16);  // left by score_tiles
      const __m512 m_old = _mm512_loadu_ps(B.m.data() + tile * 16);
      const __m512 m_new = _mm512_max_ps(m_old, mx);
      const __m512 corr = exp2_512<5>(_mm512_sub_ps(m_old, m_new));
      __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(B.l.data() + tile * 16), corr);
      // A row that has seen no key yet has m_new = NEG: subtracting at least -1e20 keeps its masked scores at ~NEG,
      // whose 2^x is 0, so no per-lane mask is needed.
      const __m512 m_sub = _mm512_max_ps(m_new, _mm512_set1_ps(-1e20f));
      alignas(64) static const int16_t pair_idx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
      const __m512i pidx = _mm512_load_si512(pair_idx);
      for (int64_t j = 0; j < npairs; ++j) {
        const __m512 s0 = _mm512_loadu_ps(st + (2 * j) * RP + tile * 16);
        const __m512 s1 = _mm512_loadu_ps(st + (2 * j + 1) * RP + tile * 16);
        const __m512 p0 = exp2_512<5>(_mm512_sub_ps(s0, m_sub));
        const __m512 p1 = exp2_512<5>(_mm512_sub_ps(s1, m_sub));
        sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);  // [p0 of 16 rows | p1 of 16 rows]
        _mm512_storeu_si512(B.pp.data() + j * RP + tile * 16, _mm512_permutexvar_epi16(pidx, both));
      }
      _mm512_storeu_ps(B.m.data() + tile * 16, m_new);
      _mm512_storeu_ps(B.l.data() + tile * 16, sum);
      _mm512_storeu_ps(B.c.data() + tile * 16, corr);
    }
    // acc = acc * corr + P V, in register blocks of NRW rows x NC chunks of 16 dims (see pv_block).
    for (int64_t tile = 0; tile < tiles; ++tile) {
      if (!B.active[tile]) continue;
      const int64_t r_end = std::min<int64_t>(R, tile * 16 + 16);
      for (int64_t d = 0; d < D; d += 64) {
        if (D - d >= 64) {
          int64_t r0 = tile * 16;
          for (; r0 + 6 <= r_end; r0 += 6) pv_block<6, 4>(B, r0, d, D, npairs, RP);
          for (; r0 < r_end; r0 += 4) pv_block<4, 4>(B, r0, d, D, npairs, RP);  // rows past R: padding lanes
        } else {
          for (int64_t r0 = tile * 16; r0 < r_end; r0 += 8) pv_block<8, 2>(B, r0, d, D, npairs, RP);
        }
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = (t.row0 + r) / G, g = (t.row0 + r) % G, head = h * G + g;
    float* o = out + ((q0 + i) * H + head) * D;
    const bool seen = B.l[r] > 0.f;
    store_row(o, B.acc.data() + r * D, D, seen ? 1.f / B.l[r] : 0.f);
    lse[(q0 + i) * H + head] = seen ? (B.m[r] + std::log2(B.l[r])) * LN2 : NEG;  // m, l are in base 2
  }
}

// Few rows (decodes): keys in the lanes instead, and one task covers every KV head of its part, so the part's K/V
// blocks stream from memory once, in order. A row's product with each of 16 keys is a few vdpbf16ps over the key's
// own cache row (no packing), and one reduction tree turns the 16 partial-sum vectors into the 16 scores (lane b =
// key b). The softmax max and sum are reductions over the 16 lanes. P V pairs keys as in run_task, but the pairs
// come from in-lane unpacks, so the accumulators hold a fixed permutation of the dims (undone at the end):
//
//   acc[h][r][2c]     lane 4L + i  <->  dim 32c + 8L + i        (L = 128-bit lane 0..3, i = 0..3)
//   acc[h][r][2c + 1] lane 4L + i  <->  dim 32c + 8L + 4 + i

// Lane b of the result is the sum of the 16 lanes of t[b].
inline __m512 hsum16(const __m512 t[16]) {
  __m512 u[8], v[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3) of keys a = 2i, b = 2i + 1
    u[i] = _mm512_add_ps(_mm512_unpacklo_ps(t[2 * i], t[2 * i + 1]), _mm512_unpackhi_ps(t[2 * i], t[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: keys 4i .. 4i + 3, summed over that lane's 4 floats
    const __m512d a = _mm512_castps_pd(u[2 * i]), b = _mm512_castps_pd(u[2 * i + 1]);
    v[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  constexpr int EVEN = _MM_SHUFFLE(2, 0, 2, 0), ODD = _MM_SHUFFLE(3, 1, 3, 1);
  const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], EVEN), _mm512_shuffle_f32x4(v[0], v[1], ODD));
  const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(v[2], v[3], EVEN), _mm512_shuffle_f32x4(v[2], v[3], ODD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, EVEN), _mm512_shuffle_f32x4(x01, x23, ODD));
}

// Part t.part for every KV head; NR rows per head (queries x heads of the GQA group).
template <int NR>
void run_small(const Task& t, Buffers& B, const Args& a) {
  const auto& [q, kv, q_ptr, q_rows, kv_ptr, kv_slots, kv_start, q_pos, H, QS, KVH, D, S, window, scale, zero_row, out,
               lse] = a;
  const int64_t G = H / KVH, DC = D / 32;  // DC: chunks of 32 dims (one register of bf16)
  const int64_t q0 = q_ptr[t.part], k0 = kv_ptr[t.part], nk = kv_ptr[t.part + 1] - k0;
  const int64_t first = kv_start[t.part];
  int64_t qrow[NR], qpos[NR], lo[NR];  // row r is query r / G, head-in-group r % G
  int64_t max_qp = -1, min_lo = std::numeric_limits<int64_t>::max();
  for (int r = 0; r < NR; ++r) {
    const int64_t row = q_rows[q0 + r / G];
    qrow[r] = row * QS + (r % G) * D;  // + h * G * D for KV head h
    qpos[r] = q_pos[row];
    lo[r] = window > 0 ? qpos[r] - window + 1 : 0;
    max_qp = std::max(max_qp, qpos[r]);
    min_lo = std::min(min_lo, lo[r]);
  }
  float* m = B.m.data();      // [KVH][NR]
  float* l = B.l.data();      // [KVH][NR]
  float* acc = B.acc.data();  // [KVH][NR][2 DC][16], dims permuted as above
  std::fill(m, m + KVH * NR, NEG);
  std::fill(l, l + KVH * NR, 0.f);
  std::fill(acc, acc + KVH * NR * D, 0.f);
  int32_t* pp = B.pp.data();  // [NR][8] probability pairs of the block
  B.pf_n = B.pf_i = 0;
  const int64_t j_begin = std::max<int64_t>(0, min_lo - first) / SMALL_KB * SMALL_KB;
  const int64_t j_end = std::min<int64_t>(nk, max_qp - first + 1);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 vscale = _mm512_set1_ps(scale), vneg = _mm512_set1_ps(NEG);
  const int64_t row_len = KVH * D, v_offset = S * row_len;
  for (int64_t j0 = j_begin; j0 < j_end; j0 += SMALL_KB) {
    const int64_t nb = std::min<int64_t>(SMALL_KB, j_end - j0);
    // Slot rows of this block (all heads); a prefetch of the next block's rows overlaps this block's work.
    const at::BFloat16* krow0[SMALL_KB];
    const at::BFloat16* vrow0[SMALL_KB];
    for (int64_t b = 0; b < SMALL_KB; ++b) {
      const bool in = b < nb;
      const int64_t slot = in ? kv_slots[k0 + j0 + b] : 0;
      krow0[b] = in ? kv + slot * row_len : nullptr;
      vrow0[b] = in ? kv + v_offset + slot * row_len : nullptr;
    }
    // The next block's cache lines (every head, K and V) are queued in B.pf and prefetched four at a time in the
    // P V loop below (one block has KVH x D lines and that loop KVH x D / 4 steps), so the fetch keeps pace with the
    // work and the CPU's few miss buffers never overflow. A task's first block has nothing to overlap: one burst.
    // (Re-issuing the next three blocks' prefetches at every block, as before, was 1.15-1.35x slower, cold.)
    if (j0 == j_begin)
      for (int64_t b = j0 + 1; b < std::min(j_end, j0 + SMALL_KB); ++b)
        queue_row(B, kv + kv_slots[k0 + b] * row_len, kv + v_offset + kv_slots[k0 + b] * row_len, row_len);
    prefetch_queued(B, B.pf_n);  // the first block's burst, or what the last block's loop left
    B.pf_n = B.pf_i = 0;
    for (int64_t b = j0 + SMALL_KB; b < std::min(j_end, j0 + 2 * SMALL_KB); ++b)
      queue_row(B, kv + kv_slots[k0 + b] * row_len, kv + v_offset + kv_slots[k0 + b] * row_len, row_len);
    const __m512i kpos = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(first + j0)), iota);
    const __mmask16 valid = static_cast<__mmask16>((1u << nb) - 1u);
    __mmask16 vis[NR];
    bool any = false;
    for (int r = 0; r < NR; ++r) {
      vis[r] = valid & _mm512_cmp_epi32_mask(kpos, _mm512_set1_epi32(static_cast<int32_t>(qpos[r])), _MM_CMPINT_LE) &
               _mm512_cmp_epi32_mask(_mm512_set1_epi32(static_cast<int32_t>(lo[r])), kpos, _MM_CMPINT_LE);
      any |= vis[r] != 0;
    }
    if (!any) continue;
    const int64_t npairs = (nb + 1) / 2;
    for (int64_t h = 0; h < KVH; ++h) {
      const at::BFloat16* krow[SMALL_KB];
      const at::BFloat16* vrow[SMALL_KB];
      for (int64_t b = 0; b < SMALL_KB; ++b) {
        krow[b] = b < nb ? krow0[b] + h * D : zero_row;
        vrow[b] = b < nb ? vrow0[b] + h * D : zero_row;
      }
      float* mh = m + h * NR;
      float* lh = l + h * NR;
      float* acch = acc + h * NR * D;
      for (int r = 0; r < NR; ++r) {
        if (!vis[r]) {  // nothing visible to this row here: no change
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(pp + r * 8), _mm256_setzero_si256());
          continue;
        }
        const at::BFloat16* qr = q + qrow[r] + h * G * D;
        __m512 part[SMALL_KB];
        for (int b = 0; b < SMALL_KB; ++b) part[b] = _mm512_setzero_ps();
        for (int64_t c = 0; c < DC; ++c) {
          const __m512i qc = _mm512_loadu_si512(qr + 32 * c);
          for (int b = 0; b < SMALL_KB; ++b) part[b] = dp(part[b], _mm512_loadu_si512(krow[b] + 32 * c), qc);
        }
        const __m512 sc = _mm512_mask_blend_ps(vis[r], vneg, _mm512_mul_ps(hsum16(part), vscale));
        const float bmax = _mm512_reduce_max_ps(sc);
        if (bmax > mh[r]) {  // a new running max: rescale what was accumulated
          const __m512 corr = exp512(_mm512_set1_ps(mh[r] - bmax));
          lh[r] *= _mm512_cvtss_f32(corr);
          for (int64_t c = 0; c < 2 * DC; ++c) {
            float* ac = acch + (r * 2 * DC + c) * 16;
            _mm512_storeu_ps(ac, _mm512_mul_ps(_mm512_loadu_ps(ac), corr));
          }
          mh[r] = bmax;
        }
        const __m512 pr = _mm512_maskz_mov_ps(vis[r], exp512(_mm512_sub_ps(sc, _mm512_set1_ps(mh[r]))));
        lh[r] += _mm512_reduce_add_ps(pr);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pp + r * 8), (__m256i)_mm512_cvtneps_pbh(pr));
      }
      for (int64_t c = 0; c < DC; ++c) {
        __m512 a0[NR], a1[NR];
        for (int r = 0; r < NR; ++r) {
          a0[r] = _mm512_loadu_ps(acch + (r * 2 * DC + 2 * c) * 16);
          a1[r] = _mm512_loadu_ps(acch + (r * 2 * DC + 2 * c + 1) * 16);
        }
        for (int64_t j = 0; j < npairs; ++j) {
          prefetch_queued(B, 4);
          __m512i vlo, vhi;
          interleave(_mm512_loadu_si512(vrow[2 * j] + 32 * c), _mm512_loadu_si512(vrow[2 * j + 1] + 32 * c), vlo, vhi);
          for (int r = 0; r < NR; ++r) {
            const __m512i pr = _mm512_set1_epi32(pp[r * 8 + j]);
            a0[r] = dp(a0[r], vlo, pr);
            a1[r] = dp(a1[r], vhi, pr);
          }
        }
        for (int r = 0; r < NR; ++r) {
          _mm512_storeu_ps(acch + (r * 2 * DC + 2 * c) * 16, a0[r]);
          _mm512_storeu_ps(acch + (r * 2 * DC + 2 * c + 1) * 16, a1[r]);
        }
      }
    }
  }
  for (int64_t h = 0; h < KVH; ++h)
    for (int r = 0; r < NR; ++r) {
      const int64_t head = h * G + r % G, hr = h * NR + r;
      float* o = out + ((q0 + r / G) * H + head) * D;
      const bool seen = l[hr] > 0.f;
      store_row(o, acc + hr * D, D, seen ? 1.f / l[hr] : 0.f);
      lse[(q0 + r / G) * H + head] = seen ? m[hr] + std::log(l[hr]) : NEG;
    }
}

// run_task for at most 3 row tiles, as a function of its own: inlined beside the many-tile one, it made that one's
// code 8% slower.
__attribute__((noinline)) void run_few_tiles(const Task& t, Buffers& B, const Args& a) { run_task<true>(t, B, a); }

using SmallFn = void (*)(const Task&, Buffers&, const Args&);
constexpr SmallFn SMALL_FNS[SMALL_MAX_ROWS + 1] = {nullptr, run_small<1>, run_small<2>, run_small<3>, run_small<4>,
                                                  run_small<5>, run_small<6>, run_small<7>, run_small<8>};

void attention(const at::BFloat16* q, const at::BFloat16* kv, const int64_t* q_ptr, const int64_t* q_rows,
               const int64_t* kv_ptr, const int64_t* kv_slots, const int64_t* kv_start, const int64_t* q_pos,
               int64_t num_parts, int64_t H, int64_t QS, int64_t KVH, int64_t D, int64_t S, int64_t window, float scale,
               float* out, float* lse) {
  const int64_t G = H / KVH;
  std::vector<Task> tasks;
  const int64_t small_rows = small_rows_limit();
  for (int64_t p = 0; p < num_parts; ++p) {
    const int64_t R = (q_ptr[p + 1] - q_ptr[p]) * G;
    if (R <= small_rows) {  // one task for every KV head: the heads of a slot are adjacent in the cache
      tasks.push_back({p, -1, 0, R});
      continue;
    }
    for (int64_t h = 0; h < KVH; ++h)
      for (int64_t r0 = 0; r0 < R; r0 += TASK_ROWS) tasks.push_back({p, h, r0, std::min(TASK_ROWS, R - r0)});
  }
  const bool has_tasks = std::any_of(tasks.begin(), tasks.end(), [](const Task& t) { return t.head >= 0; });
  // Longest tasks (rows x keys) first, so dynamic scheduling ends balanced.
  auto work = [&](const Task& t) { return t.nrows * (t.head < 0 ? KVH : 1) * (kv_ptr[t.part + 1] - kv_ptr[t.part]); };
  std::sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& b) { return work(a) > work(b); });
  std::vector<at::BFloat16> zero_row(D, at::BFloat16(0.f));
  const Args args{q, kv, q_ptr, q_rows, kv_ptr, kv_slots, kv_start, q_pos, H, QS, KVH, D, S, window, scale,
                  zero_row.data(), out, lse};
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
#pragma omp parallel
  {
    Buffers B;  // a local: a thread_local kept across calls ran 1.15-1.2x slower (benchmarks/kernel_ab.py)
    B.reserve(D, KVH, has_tasks);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_tasks; ++i) {
      const Task& t = tasks[i];
      if (t.head < 0) {  // a few rows: padding them to 16 lanes would waste the work
        SMALL_FNS[t.nrows](t, B, args);
      } else if (t.nrows <= 48) {  // at most 3 row tiles
        run_few_tiles(t, B, args);
      } else {
        run_task<false>(t, B, args);
      }
    }
  }
}

}  // namespace bf16k
#endif

}  // namespace

std::vector<at::Tensor> ragged_attention(at::Tensor q, at::Tensor kv, at::Tensor q_ptr, at::Tensor q_rows,
                                         at::Tensor kv_ptr, at::Tensor kv_slots, at::Tensor kv_start,
                                         at::Tensor q_pos, int64_t window, double scale) {
  TORCH_CHECK(kv.is_contiguous(), "kv must be contiguous");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "q rows must hold H x D contiguous values");
  TORCH_CHECK(q.scalar_type() == kv.scalar_type(), "q and kv must share a dtype");
  const int64_t H = q.size(1), D = q.size(2), KVH = kv.size(2), S = kv.size(1), QS = q.stride(0);
  TORCH_CHECK(H % KVH == 0, "query heads must be a multiple of kv heads");
  const int64_t P = kv_start.size(0), NQ = q_rows.size(0);
  auto out = at::empty({NQ, H, D}, q.options().dtype(at::kFloat));
  auto lse = at::empty({NQ, H}, q.options().dtype(at::kFloat));
  const int64_t* ptrs[6] = {q_ptr.data_ptr<int64_t>(), q_rows.data_ptr<int64_t>(), kv_ptr.data_ptr<int64_t>(),
                            kv_slots.data_ptr<int64_t>(), kv_start.data_ptr<int64_t>(), q_pos.data_ptr<int64_t>()};
#ifdef BATCHLLM_HAS_BF16_KERNEL
  if (q.scalar_type() == at::ScalarType::BFloat16 && D % 32 == 0) {
    bf16k::attention(q.data_ptr<at::BFloat16>(), kv.data_ptr<at::BFloat16>(), ptrs[0], ptrs[1], ptrs[2], ptrs[3],
                     ptrs[4], ptrs[5], P, H, QS, KVH, D, S, window, static_cast<float>(scale), out.data_ptr<float>(),
                     lse.data_ptr<float>());
    return {out, lse};
  }
#endif
  // Without AVX512-BF16 (or for an fp32 cache, the exact dtype), attention_f32.cpp's kernels: fp32 arithmetic in
  // vectors; the portable loop only where they are not built or head_dim does not suit them.
  auto run = [&](auto* q_data, auto* kv_data) {
#if defined(BATCHLLM_HAS_VEC)
    if (f32_attention(q_data, kv_data, ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4], ptrs[5], P, H, QS, KVH, D, S,
                      window, static_cast<float>(scale), out.data_ptr<float>(), lse.data_ptr<float>(),
                      F32_SMALL_ROWS))
      return;
#endif
    ragged_kernel(q_data, kv_data, ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4], ptrs[5], P, H, QS, KVH, D, S, window,
                  static_cast<float>(scale), out.data_ptr<float>(), lse.data_ptr<float>());
  };
  if (q.scalar_type() == at::ScalarType::BFloat16) {
    run(q.data_ptr<at::BFloat16>(), kv.data_ptr<at::BFloat16>());
  } else {
    TORCH_CHECK(q.scalar_type() == at::ScalarType::Float, "ragged_attention takes bf16 or fp32");
    run(q.data_ptr<float>(), kv.data_ptr<float>());
  }
  return {out, lse};
}
