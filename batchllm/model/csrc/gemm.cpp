// bf16 matrix product for the linear projections on CPU: y = x W^T (+ b), fp32 accumulation. Two tile kernels over one
// packing: with AVX512-BF16, `vdpbf16ps` multiplies pairs of bf16 directly; on AVX-512F or AVX2 (`f32tile`), x is
// converted to fp32 once and each weight pair is split into two fp32 vectors in registers (a shift and a mask), then
// FMAs: half the memory of fp32 weights, fp32 arithmetic, the same row independence and gated epilogue.
//
//   pack_weight(w [N, K], gated) -> packed [P, K/2, 64, 2]   P = ceil(N / 64) panels of 64 output columns; columns
//                                                            past N are zero; K must be even
//   gemm(x [M, K], packed, n, bias [n] or None, gated, next) -> [M, n], or [M, n/2] when gated; next: the packed
//                                                            weight of the following product, or None (see "Work")
//   pack_weight_f32(w [N, K] fp32, gated) -> packed [P, K, 64]  fp32 weights (dtype=float32), every vector build
//   gemm_f32(x [M, K] fp32, packed, n, bias, gated, next) -> [M, n] fp32 (gated: [M, n/2])  fp32 FMAs, each output
//                                                            the sum over k in order
//
// gated: w is a fused [gate; up] projection [2I, K] (the MLP's gate_up). Each panel then holds 32 gate columns and the
// 32 up columns of the same features (P = ceil(I / 32)), and the tile's epilogue writes bf16(silu(gate) * up) with the
// roundings of `silu_mul` (fused_ops.cpp): the same bits as silu_mul(gemm(x, w)), without writing or reading the
// [M, 2I] product (likewise in fp32: silu(gate) * up, the bits of the fp32 silu_mul).
//
// Layout of one panel (64 output columns c0 .. c0+63), K/2 steps of 128 bytes each; step j holds, for every column
// c, the pair W[c][2j], W[c][2j+1]:
//
//     step j: | c0: w[2j] w[2j+1] | c0+1: w[2j] w[2j+1] | ... | c0+63: w[2j] w[2j+1] |   = 4 zmm registers
//
// so one `vdpbf16ps` multiplies a broadcast pair x[m][2j], x[m][2j+1] with 16 columns' pairs and adds both products
// to 16 fp32 sums. A tile is up to MR rows x 64 columns: MR x 4 accumulators. Every output element is the same
// chain of `vdpbf16ps` over j = 0 .. K/2-1, whatever the number of rows, the tile it falls in or the thread count:
// a row's result does not depend on the rest of the batch (tests check this bit for bit).
//
// Work (`for_tiles`, both products): rows are cut into blocks whose x rows stay in L2 (ROW_BLOCK_BYTES), each block
// into tiles of nearly equal height <= MR; the items (row block, panel) are split over torch's threads, whole, and
// the few left over when they do not divide evenly are split by tiles, so no thread waits on another's extra panel.
// While a thread works on a panel, its tiles prefetch the thread's next panel (into L1), a few lines per step (a burst
// would stall on the miss buffers), so a decode step's small batch streams the weights instead of waiting on each
// panel. Given the weight of the product that comes next (`next`: the layer's next projection, see Linear.chain),
// each thread's last panel prefetches its first panel of that call (a model's weights pass through memory every
// step): a 48-row step's products over 30 layers of cold weights 1.025x, 16 rows 1.06x (AVX2 path).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "vec.h"

#ifdef BATCHLLM_HAS_VEC
namespace {

using bf16 = at::BFloat16;
constexpr int64_t COLS = 64;                      // output columns per panel
constexpr int NV = COLS / 16;                     // zmm registers per step of a panel
// rows per tile. AVX2: 6 x 2 accumulators, 2 weight vectors (one half of the pairs at a time) and a broadcast x take 15
// of the 16 ymm, so a 6-row tile over bf16 weights clears the odd half of the pairs with two shifts, not a mask in a
// register (ODD_BY_SHIFTS). 6 rows with the mask spilled (62-65% of the FMA peak). SmolLM2's projections, 44-1400 rows,
// 2 threads, Zen 5: 5-row tiles ran at 86-88% (bf16 weights) and 83-88% (fp32), 6-row tiles run at 90-96% and
// 92-95%; kernel_ab.py --gemm 1.01-1.05x at 30-300 rows, 1.09-1.15x at 12, unchanged at 1-10. The tile templates are
// noinline: inlined into their dispatch, every tile ran 0.65-0.9x (register allocation across the switch).
constexpr int MR = 6;
constexpr int64_t ROW_BLOCK_BYTES = 512 * 1024;   // x rows of one row block, kept in L2

// Output column j of panel p comes from weight row source_row(p, j, ...), or from none (-1: a zero column).
int64_t source_row(int64_t p, int64_t j, int64_t N, bool gated) {
  if (!gated) return p * COLS + j < N ? p * COLS + j : -1;
  const int64_t half = COLS / 2, inter = N / 2, feature = p * half + j % half;
  if (feature >= inter) return -1;
  return j < half ? feature : inter + feature;
}


// The fp32 FMA tiles (bf16 weights on AVX2 and AVX-512F, fp32 weights on every vector path) cut a panel into column
// groups of one vector (GN columns); a tile is up to MR rows x CG groups: MR x CG accumulators (24 zmm, 10 ymm).
using V = vec::Best;
constexpr int GN = V::N;                   // columns of one column group (one vector)
constexpr int64_t GROUPS = COLS / GN;      // column groups per panel
constexpr int CG = V::N == 16 ? 4 : 2;     // column groups per tile

// Tile t of a panel: its CG column groups and the output column of each. Non-gated: groups t CG .. t CG + CG - 1,
// written to their own columns. Gated (gate columns in the panel's first half, their up columns in the second):
// gate groups h = t CG/2 .. with up groups h + GROUPS/2, written to column h GN of the features. Returns the number of
// tiles of a panel.
inline int64_t tile_groups(int64_t t, bool gated, int64_t* group, int64_t* out_col) {
  const int64_t per_tile = gated ? CG / 2 : CG;
  for (int g = 0; g < CG; ++g) {
    const int64_t h = t * per_tile + g % per_tile;
    group[g] = gated && g >= per_tile ? h + GROUPS / 2 : h;
    out_col[g] = h * GN;
  }
  return (gated ? GROUPS / 2 : GROUPS) / per_tile;
}

// Calls tile(std::integral_constant<int, R>) with R = rows (1 .. MR).
template <class Tile>
inline void by_rows(int64_t rows, const Tile& tile) {
  switch (rows) {
    case 1: return tile(std::integral_constant<int, 1>{});
    case 2: return tile(std::integral_constant<int, 2>{});
    case 3: return tile(std::integral_constant<int, 3>{});
    case 4: return tile(std::integral_constant<int, 4>{});
    case 5: return tile(std::integral_constant<int, 5>{});
    default: return tile(std::integral_constant<int, MR>{});
  }
}

// Bresenham: `lines` prefetches (64-byte lines, from pf on) spread evenly over a tile's `steps` steps. Into L1 (T0):
// with cold weights 1.00-1.14x over L2 only (T1; kernel_ab.py --gemm --cold, Zen 5: most at 1-8 rows, 1.02-1.03x
// at 48 on AVX2, never slower beyond noise).
struct SpreadPrefetch {
  const char* pf;
  int64_t lines, steps, acc = 0;
  void step() {
    acc += lines;
    while (acc >= steps) {
      acc -= steps;
      _mm_prefetch(pf, _MM_HINT_T0);
      pf += 64;
    }
  }
};

#ifdef BATCHLLM_HAS_BF16_KERNEL
using XRow = uint32_t;  // x as bf16 pairs

// One tile: rows x[0 .. R-1] (row stride ldx pairs) times one panel over `steps` pairs, written to c (row stride
// ldc) as bf16, columns [0, ncols) of the panel. Meanwhile prefetches `pf_lines` lines from `pf`.
template <int R>
void tile(const uint32_t* x, int64_t ldx, const __m512i* w, int64_t steps, const float* bias, bf16* c, int64_t ldc,
          int64_t ncols, const char* pf, int64_t pf_lines, bool gated) {
  __m512 acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  SpreadPrefetch prefetch{pf, pf_lines, steps};
  for (int64_t j = 0; j < steps; ++j) {
    __m512i wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_si512(w + NV * j + v);  // [16 columns x 2]
    prefetch.step();
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[i * ldx + j]));  // x[i][2j], x[i][2j+1]
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], xb, (__m512bh)wv[v]);
    }
  }
  if (bias != nullptr)  // padded to whole panels
    for (int i = 0; i < R; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_add_ps(acc[i][v], _mm512_loadu_ps(bias + 16 * v));
  if (gated) {  // registers 0, 1: gate of 32 features; 2, 3: their up. ncols counts features here.
    for (int i = 0; i < R; ++i)
      for (int v = 0; v < NV / 2; ++v) {
        const int64_t n = std::min<int64_t>(16, ncols - 16 * v);
        if (n <= 0) break;
        const vec::V16 silu = vec::silu_bf16(vec::V16(acc[i][v]).round_bf16());
        (silu * vec::V16(acc[i][v + NV / 2]).round_bf16()).store_bf16(c + i * ldc + 16 * v, n);
      }
    return;
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) {
      const int64_t n = std::min<int64_t>(16, ncols - 16 * v);
      if (n <= 0) break;
      vec::V16(acc[i][v]).store_bf16(c + i * ldc + 16 * v, n);
    }
}

void tile_rows(int64_t rows, const XRow* x, int64_t ldx, const void* w_, int64_t steps, const float* bias,
               bf16* c, int64_t ldc, int64_t ncols, const char* pf, int64_t pf_lines, bool gated) {
  const __m512i* w = static_cast<const __m512i*>(w_);
  switch (rows) {
    case 1: return tile<1>(x, ldx, w, steps, bias, c, ldc, ncols, pf, pf_lines, gated);
    case 2: return tile<2>(x, ldx, w, steps, bias, c, ldc, ncols, pf, pf_lines, gated);
    case 3: return tile<3>(x, ldx, w, steps, bias, c, ldc, ncols, pf, pf_lines, gated);
    case 4: return tile<4>(x, ldx, w, steps, bias, c, ldc, ncols, pf, pf_lines, gated);
    case 5: return tile<5>(x, ldx, w, steps, bias, c, ldc, ncols, pf, pf_lines, gated);
    default: return tile<MR>(x, ldx, w, steps, bias, c, ldc, ncols, pf, pf_lines, gated);
  }
}

#else
using XRow = float;  // x converted to fp32 once per call

// The bf16 pairs of a column group at step j: the even-k weights as fp32 (the low halves), and the odd-k ones (the
// high halves, masked). `odd_half_by_shifts` clears the low halves with two shifts instead of the mask, which then
// needs no register (one more instruction).
inline V even_half(const bf16* w) {
#if defined(BATCHLLM_HAS_V16)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(w), 16));
#else
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), 16));
#endif
}

inline V odd_half(const bf16* w) {
#if defined(BATCHLLM_HAS_V16)
  return _mm512_castsi512_ps(
      _mm512_and_si512(_mm512_loadu_si512(w), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
#else
  return _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)),
                                              _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
#endif
}

inline V odd_half_by_shifts(const bf16* w) {
#if defined(BATCHLLM_HAS_V16)
  return odd_half(w);
#else
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(raw, 16), 16));
#endif
}

// Whether a tile of R rows clears the odd half by shifts: where the mask would take the last of the 16 registers
// (AVX2, 6 rows: 12 accumulators, 2 weight vectors, a broadcast x).
template <int R>
constexpr bool ODD_BY_SHIFTS = V::N == 8 && R * CG + CG + 2 >= 16;

// One tile: R rows of fp32 x (row stride ldx) times the CG column groups `group[]` of one panel (pairs layout: step j
// holds 2 * COLS bf16), every output the same chain of FMAs over k = 0 .. K-1 whatever the batch. Non-gated: writes
// the groups' columns; gated: group[0 .. CG/2) are gate columns whose up columns are group[CG/2 ..), and the tile
// writes bf16(silu(gate) * up) of their features.
template <int R>
__attribute__((noinline)) void f32tile(const float* x, int64_t ldx, const bf16* panel, int64_t steps,
                                       const int64_t* group, const float* bias, bf16* c, int64_t ldc,
                                       const int64_t* out_col, int64_t ncols, const char* pf, int64_t pf_lines,
                                       bool gated) {
  V acc[R][CG];
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < CG; ++g) acc[i][g] = V::zero();
  SpreadPrefetch prefetch{pf, pf_lines, steps};
  for (int64_t j = 0; j < steps; ++j) {
    const bf16* wj = panel + j * 2 * COLS;
    prefetch.step();
    // Even k for every row, then odd k: each accumulator gets the same FMAs in the same order as one row at a
    // time would give, but only CG weight vectors are live at once (with both halves, the AVX2 tile needed 17
    // registers and spilled). The odd half reads the pairs again (an L1 hit).
    V w[CG];
    for (int g = 0; g < CG; ++g) w[g] = even_half(wj + group[g] * 2 * GN);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const V xe = V::set1(x[i * ldx + 2 * j]);
      for (int g = 0; g < CG; ++g) acc[i][g] = V::fma(xe, w[g], acc[i][g]);
    }
    for (int g = 0; g < CG; ++g)
      w[g] = ODD_BY_SHIFTS<R> ? odd_half_by_shifts(wj + group[g] * 2 * GN) : odd_half(wj + group[g] * 2 * GN);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const V xo = V::set1(x[i * ldx + 2 * j + 1]);
      for (int g = 0; g < CG; ++g) acc[i][g] = V::fma(xo, w[g], acc[i][g]);
    }
  }
  if (bias != nullptr)  // padded to whole panels
    for (int i = 0; i < R; ++i)
      for (int g = 0; g < CG; ++g) acc[i][g] = acc[i][g] + V::load(bias + group[g] * GN);
  const int out_groups = gated ? CG / 2 : CG;
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < out_groups; ++g) {
      const int64_t n = std::min<int64_t>(GN, ncols - out_col[g]);
      if (n <= 0) continue;
      V y = acc[i][g];
      if (gated) y = vec::silu_bf16(y.round_bf16()) * acc[i][g + CG / 2].round_bf16();
      y.store_bf16(c + i * ldc + out_col[g], n);
    }
}

// The tiles of one (row block, panel) item over all its column groups; `rows` <= MR.
void tile_rows(int64_t rows, const XRow* x, int64_t ldx, const void* w, int64_t steps, const float* bias, bf16* c,
               int64_t ldc, int64_t ncols, const char* pf, int64_t pf_lines, bool gated) {
  const bf16* panel = static_cast<const bf16*>(w);
  int64_t group[CG], out_col[CG];
  const int64_t tiles = tile_groups(0, gated, group, out_col);
  for (int64_t t = 0; t < tiles; ++t) {
    tile_groups(t, gated, group, out_col);
    if (out_col[0] >= ncols) break;
    const char* tpf = pf == nullptr ? nullptr : pf + 64 * (pf_lines * t / tiles);
    const int64_t tlines = pf_lines * (t + 1) / tiles - pf_lines * t / tiles;
    by_rows(rows, [&](auto r) {
      f32tile<decltype(r)::value>(x, ldx, panel, steps, group, bias, c, ldc, out_col, ncols, tpf, tlines, gated);
    });
  }
}
#endif

// fp32 weights (dtype=float32, the exact dtype): panels of 64 columns [P, K, 64] fp32, each row k the 64 columns' k-th
// weights (gated: as the bf16 packing, 32 gate columns then their 32 up columns), and fp32 FMAs in every vector build.
// A tile is R rows x CG column groups of one panel (`tile_groups`); every output is the chain of FMAs over
// k = 0 .. K-1 in order, whatever the batch. Gated, the tile writes silu(gate) * up: the bits of `silu_mul` (fp32)
// applied to the plain product.
template <int R>
__attribute__((noinline)) void f32w_tile(const float* x, int64_t ldx, const float* panel, int64_t K,
                                         const int64_t* group, const float* bias, float* c, int64_t ldc,
                                         const int64_t* out_col, int64_t ncols, const char* pf, int64_t pf_lines,
                                         bool gated) {
  V acc[R][CG];
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < CG; ++g) acc[i][g] = V::zero();
  SpreadPrefetch prefetch{pf, pf_lines, K};
  for (int64_t k = 0; k < K; ++k) {
    prefetch.step();
    V w[CG];
    for (int g = 0; g < CG; ++g) w[g] = V::load(panel + k * COLS + group[g] * GN);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const V xk = V::set1(x[i * ldx + k]);
      for (int g = 0; g < CG; ++g) acc[i][g] = V::fma(xk, w[g], acc[i][g]);
    }
  }
  if (bias != nullptr)  // padded to whole panels
    for (int i = 0; i < R; ++i)
      for (int g = 0; g < CG; ++g) acc[i][g] = acc[i][g] + V::load(bias + group[g] * GN);
  const int out_groups = gated ? CG / 2 : CG;
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < out_groups; ++g) {
      const int64_t n = std::min<int64_t>(GN, ncols - out_col[g]);
      if (n <= 0) continue;
      const V y = gated ? vec::silu(acc[i][g]) * acc[i][g + CG / 2] : acc[i][g];
      y.store(c + i * ldc + out_col[g], n);
    }
}

// The tiles of `rows` (<= MR) rows over one panel's column tiles.
void f32w_rows(int64_t rows, const float* x, int64_t ldx, const float* panel, int64_t K, const float* bias, float* c,
               int64_t ldc, int64_t ncols, const char* pf, int64_t pf_lines, bool gated) {
  int64_t group[CG], out_col[CG];
  const int64_t tiles = tile_groups(0, gated, group, out_col);
  for (int64_t t = 0; t < tiles; ++t) {
    tile_groups(t, gated, group, out_col);
    if (out_col[0] >= ncols) break;
    const char* tpf = pf == nullptr ? nullptr : pf + 64 * (pf_lines * t / tiles);
    const int64_t tl = pf_lines * (t + 1) / tiles - pf_lines * t / tiles;
    by_rows(rows, [&](auto r) {
      f32w_tile<decltype(r)::value>(x, ldx, panel, K, group, bias, c, ldc, out_col, ncols, tpf, tl, gated);
    });
  }
}

// How for_tiles splits an M-row product over P panels (x rows of `x_bytes`) among `threads` threads: row blocks of
// `block` rows (`num_blocks` of them); items (row block, panel) numbered block-major; thread th takes items
// th * per .. th * per + per - 1 whole, then its share of the tiles of each of the `extra` items left over: with 9
// panels on 2 threads, 4 panels each and half the rows of the ninth (whole items alone would give 5 and 4).
struct Split {
  int64_t block, num_blocks, items, per, extra, max_tiles;
  Split(int64_t M, int64_t P, int64_t x_bytes, int64_t threads) {
    // Row blocks of nearly equal size: as few as keep a block's x rows within ROW_BLOCK_BYTES (each block streams the
    // whole weight once), and at least as many as give every thread an item when the panels are fewer than threads.
    const int64_t cap = std::max<int64_t>(MR, ROW_BLOCK_BYTES / x_bytes);
    const int64_t blocks = std::min((M + MR - 1) / MR, std::max((M + cap - 1) / cap, (threads + P - 1) / P));
    block = ((M + blocks - 1) / blocks + MR - 1) / MR * MR;
    num_blocks = (M + block - 1) / block;
    items = num_blocks * P;
    per = items / threads;
    extra = items - per * threads;
    max_tiles = (block + MR - 1) / MR;
  }
  // The panel of thread th's first item.
  int64_t first_panel(int64_t th, int64_t P) const { return per > 0 ? th * per % P : 0; }  // else: the extra items, by tiles
};

// The call after this one (see the header's "Work"): its packed weight, P panels of panel_bytes, and its x rows'
// bytes (its rows: as many as this call's).
struct NextCall {
  const char* weights = nullptr;
  int64_t P = 0, panel_bytes = 0, x_bytes = 0;
};

// Runs tile(rows, m0, p, pf, pf_lines) for every tile of an M-row product over P panels (`panel_bytes` each, from
// `weights`, x rows of `x_bytes`): rows m0 .. m0 + rows - 1 of panel p, while prefetching pf_lines 64-byte lines from
// pf (the calling thread's next panel; after its last, its first panel of `next_call`). The split is the header's
// "Work".
template <class Tile>
void for_tiles(int64_t M, int64_t P, int64_t x_bytes, const char* weights, int64_t panel_bytes, const NextCall& next_call,
               const Tile& tile) {
  const int64_t threads = at::get_num_threads();
  const Split s(M, P, x_bytes, threads);
  const int64_t panel_lines = panel_bytes / 64;
  // Tiles t0 .. t1 - 1 of item (row block, panel), of `tiles` in all; prefetches a share of `next` (`lines` lines).
  auto run = [&](int64_t item, int64_t t0, int64_t t1, const char* next, int64_t lines) {
    const int64_t rb = item / P, p = item % P;
    const int64_t r0 = rb * s.block, rn = std::min(s.block, M - r0);
    const int64_t tiles = (rn + MR - 1) / MR, t_end = std::min(t1, tiles);
    int64_t m0 = r0, left = rn;
    for (int64_t t = 0; t < t_end; ++t) {
      const int64_t rows = (left + (tiles - t) - 1) / (tiles - t);  // nearly equal heights
      if (t >= t0) {
        // this tile's share of the next panel's lines
        const int64_t la = lines * (t - t0) / (t_end - t0), lb = lines * (t - t0 + 1) / (t_end - t0);
        tile(rows, m0, p, next == nullptr ? nullptr : next + 64 * la, next == nullptr ? 0 : lb - la);
      }
      m0 += rows;
      left -= rows;
    }
  };
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t th = begin; th < end; ++th) {
      const char* call_next = nullptr;  // this thread's first panel of the next call, for the same rows
      int64_t call_lines = 0;
      if (next_call.weights != nullptr) {
        const Split ns(M, next_call.P, next_call.x_bytes, threads);
        call_next = next_call.weights + ns.first_panel(th, next_call.P) * next_call.panel_bytes;
        call_lines = next_call.panel_bytes / 64;
      }
      const int64_t first = th * s.per, t0 = s.max_tiles * th / threads, t1 = s.max_tiles * (th + 1) / threads;
      const int64_t n = t0 < t1 ? s.per + s.extra : s.per;  // a thread with no share of the tiles skips the extra items
      for (int64_t i = 0; i < n; ++i) {
        const bool whole = i < s.per;
        const int64_t item = whole ? first + i : s.per * threads + (i - s.per);
        const int64_t after = i + 1 < s.per ? first + i + 1 : s.per * threads + (i + 1 - s.per);  // this thread's next
        const char* next = i + 1 < n ? weights + (after % P) * panel_bytes : call_next;
        const int64_t lines = i + 1 < n ? panel_lines : call_lines;
        if (whole) run(item, 0, s.max_tiles, next, lines);
        else run(item, t0, t1, next, lines);
      }
    }
  });
}

// x [..., K] as contiguous rows [M, K], and an uninitialised output [..., width] with x's options.
std::pair<at::Tensor, at::Tensor> rows_and_output(const at::Tensor& x_in, int64_t K, int64_t width) {
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = width;
  return {x_in.reshape({-1, K}).contiguous(), at::empty(shape, x_in.options())};
}

// The call after this one, from its packed weight (either packing; none: nothing to prefetch), for x elements of
// `x_elem` bytes (as this call's: the rows of a step go through the layer's projections in turn).
NextCall next_call(const std::optional<at::Tensor>& next, int64_t x_elem) {
  NextCall c;
  if (!next.has_value() || !next->defined()) return c;
  TORCH_CHECK(next->is_contiguous() && (next->dim() == 3 || next->dim() == 4) && next->size(2) == COLS &&
                  next->device().is_cpu(), "gemm: `next` must be a packed weight");
  const int64_t K = next->dim() == 4 ? 2 * next->size(1) : next->size(1);  // [P, K/2, 64, 2] bf16 or [P, K, 64] fp32
  c.weights = static_cast<const char*>(next->data_ptr());
  c.P = next->size(0);
  c.panel_bytes = next->numel() / c.P * next->element_size();
  c.x_bytes = K * x_elem;
  return c;
}

}  // namespace

at::Tensor gemm_pack_weight(const at::Tensor& w, bool gated) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.device().is_cpu(), "pack_weight: bf16 [N, K] on CPU");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % 2 == 0 && K > 0, "pack_weight: K must be even, got ", K);
  TORCH_CHECK(!gated || N % 2 == 0, "pack_weight: a gated weight has 2I rows, got ", N);
  const int64_t P = gated ? (N / 2 + COLS / 2 - 1) / (COLS / 2) : (N + COLS - 1) / COLS, steps = K / 2;
  const at::Tensor src = w.contiguous();
  at::Tensor out = at::zeros({P, steps, COLS, 2}, w.options());
  const bf16* s = src.data_ptr<bf16>();
  bf16* d = out.data_ptr<bf16>();
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t col = 0; col < COLS; ++col) {
        const int64_t r = source_row(p, col, N, gated);
        if (r < 0) continue;
        const bf16* row = s + r * K;
        for (int64_t j = 0; j < steps; ++j) {
          bf16* pair = d + ((p * steps + j) * COLS + col) * 2;
          pair[0] = row[2 * j];
          pair[1] = row[2 * j + 1];
        }
      }
  });
  return out;
}

at::Tensor gemm(const at::Tensor& x_in, const at::Tensor& packed, int64_t n, const std::optional<at::Tensor>& bias,
                bool gated, const std::optional<at::Tensor>& next) {
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16 && packed.dim() == 4 &&
                  packed.size(2) == COLS && packed.size(3) == 2 && packed.is_contiguous(),
              "gemm: bf16 x and a packed weight from pack_weight");
  const int64_t steps = packed.size(1), K = 2 * steps, P = packed.size(0);
  const int64_t per_panel = gated ? COLS / 2 : COLS;  // output columns of one panel
  const int64_t width = gated ? n / 2 : n;  // output columns
  TORCH_CHECK(x_in.size(-1) == K && n > 0 && (!gated || n % 2 == 0) && (width + per_panel - 1) / per_panel == P,
              "gemm: x [..., ", K, "] and n matching the packed weight");
  const auto [x, out] = rows_and_output(x_in, K, width);  // [M, K], [..., width]
  const int64_t M = x.size(0);
  if (M == 0) return out;
  at::Tensor b32;  // bias in fp32, laid out as the panels' columns
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, "gemm: bias of ", n, " values");
    const at::Tensor b = bias->reshape({n}).to(at::kFloat).contiguous();
    b32 = at::zeros({P * COLS}, x_in.options().dtype(at::kFloat));
    for (int64_t p = 0; p < P; ++p)
      for (int64_t j = 0; j < COLS; ++j) {
        const int64_t r = source_row(p, j, n, gated);
        if (r >= 0) b32.data_ptr<float>()[p * COLS + j] = b.data_ptr<float>()[r];
      }
  }
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
#ifdef BATCHLLM_HAS_BF16_KERNEL
  const XRow* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<bf16>());  // pairs
  const int64_t ldx = steps, x_bytes = 2 * K;
#else
  const at::Tensor xf = x.to(at::kFloat);  // [M, K]: converted once, read by every panel
  const XRow* xp = xf.data_ptr<float>();
  const int64_t ldx = K, x_bytes = 4 * K;
#endif
  const bf16* wp = packed.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();

  const int64_t panel_values = steps * 2 * COLS;
  for_tiles(M, P, x_bytes, reinterpret_cast<const char*>(wp), panel_values * 2, next_call(next, x_bytes / K),
            [&](int64_t rows, int64_t m0, int64_t p, const char* pf, int64_t pf_lines) {
              const int64_t ncols = std::min<int64_t>(per_panel, width - p * per_panel);
              tile_rows(rows, xp + m0 * ldx, ldx, wp + p * panel_values, steps,
                        bp == nullptr ? nullptr : bp + p * COLS, op + m0 * width + p * per_panel, width, ncols, pf,
                        pf_lines, gated);
            });
  return out;
}

at::Tensor gemm_pack_weight_f32(const at::Tensor& w, bool gated) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.device().is_cpu(), "pack_weight_f32: fp32 [N, K] on CPU");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K > 0, "pack_weight_f32: K must be positive");
  TORCH_CHECK(!gated || N % 2 == 0, "pack_weight_f32: a gated weight has 2I rows, got ", N);
  const int64_t P = gated ? (N / 2 + COLS / 2 - 1) / (COLS / 2) : (N + COLS - 1) / COLS;
  // the panels' columns as rows of w, a missing column as row N (zeros)
  at::Tensor index = at::empty({P * COLS}, w.options().dtype(at::kLong));
  int64_t* pi = index.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    for (int64_t j = 0; j < COLS; ++j) {
      const int64_t r = source_row(p, j, N, gated);
      pi[p * COLS + j] = r >= 0 ? r : N;
    }
  const at::Tensor rows = at::cat({w, at::zeros({1, K}, w.options())}).index_select(0, index);  // [P * 64, K]
  return rows.view({P, COLS, K}).transpose(1, 2).contiguous();  // [P, K, 64]
}

at::Tensor gemm_f32(const at::Tensor& x_in, const at::Tensor& packed, int64_t n, const std::optional<at::Tensor>& bias,
                    bool gated, const std::optional<at::Tensor>& next) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat && packed.dim() == 3 &&
                  packed.size(2) == COLS && packed.is_contiguous(),
              "gemm_f32: fp32 x and a packed weight from pack_weight_f32");
  const int64_t K = packed.size(1), P = packed.size(0);
  const int64_t per_panel = gated ? COLS / 2 : COLS;  // output columns of one panel
  const int64_t width = gated ? n / 2 : n;  // output columns
  TORCH_CHECK(x_in.size(-1) == K && n > 0 && (!gated || n % 2 == 0) && (width + per_panel - 1) / per_panel == P,
              "gemm_f32: x [..., ", K, "] and n matching the packed weight");
  const auto [x, out] = rows_and_output(x_in, K, width);  // [M, K], [..., width]
  const int64_t M = x.size(0);
  if (M == 0) return out;
  at::Tensor b32;  // bias laid out as the panels' columns
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, "gemm_f32: bias of ", n, " values");
    const at::Tensor b = bias->reshape({n}).contiguous();
    b32 = at::zeros({P * COLS}, x_in.options());
    for (int64_t p = 0; p < P; ++p)
      for (int64_t j = 0; j < COLS; ++j) {
        const int64_t r = source_row(p, j, n, gated);
        if (r >= 0) b32.data_ptr<float>()[p * COLS + j] = b.data_ptr<float>()[r];
      }
  }
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t panel_values = K * COLS;
  for_tiles(M, P, 4 * K, reinterpret_cast<const char*>(wp), panel_values * 4, next_call(next, 4),
            [&](int64_t rows, int64_t m0, int64_t p, const char* pf, int64_t pf_lines) {
              f32w_rows(rows, xp + m0 * K, K, wp + p * panel_values, K, bp == nullptr ? nullptr : bp + p * COLS,
                        op + m0 * width + p * per_panel, width, std::min<int64_t>(per_panel, width - p * per_panel),
                        pf, pf_lines, gated);
            });
  return out;
}

// The arithmetic peak of this kernel path on torch's threads, in FLOP/s: each thread runs 12 independent chains of
// the tile's instruction (vdpbf16ps: 64 FLOP; an fp32 FMA: 2 per lane) for `iters` steps; the slowest thread's time
// counts. What the gemm benchmark (benchmarks/kernel_efficiency.py) measures the gemm against.
double peak_flops(int64_t iters) {
  constexpr int CHAINS = 12;
#ifdef BATCHLLM_HAS_BF16_KERNEL
  using Acc = __m512;
  constexpr double FLOP = 64;
#else
  using Acc = vec::Best;
  constexpr double FLOP = 2 * vec::Best::N;
#endif
  const int threads = at::get_num_threads();
  std::vector<double> seconds(threads, 0.0);
  float sink = 0.f;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  {
    Acc acc[CHAINS];
#ifdef BATCHLLM_HAS_BF16_KERNEL
    const __m512i a = _mm512_set1_epi32(0x3F803F80), b = _mm512_set1_epi32(0x3F003F00);  // bf16 pairs (1, 1), (.5, .5)
    for (int c = 0; c < CHAINS; ++c) acc[c] = _mm512_setzero_ps();
#else
    const Acc a = Acc::set1(0.999f), b = Acc::set1(1e-3f);
    for (int c = 0; c < CHAINS; ++c) acc[c] = Acc::zero();
#endif
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < iters; ++i)
      for (int c = 0; c < CHAINS; ++c)
#ifdef BATCHLLM_HAS_BF16_KERNEL
        acc[c] = _mm512_dpbf16_ps(acc[c], (__m512bh)a, (__m512bh)b);
#else
        acc[c] = Acc::fma(acc[c], a, b);
#endif
    seconds[omp_get_thread_num()] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    float out[vec::Best::N * 2];
    for (int c = 0; c < CHAINS; ++c) {
#ifdef BATCHLLM_HAS_BF16_KERNEL
      _mm512_storeu_ps(out, acc[c]);
#else
      acc[c].store(out);
#endif
      sink += out[0];
    }
  }
  const double slowest = *std::max_element(seconds.begin(), seconds.end());
  return sink == -1.f ? 0.0 : FLOP * CHAINS * static_cast<double>(iters) * threads / slowest;
}

#else  // no vectors: Linear does not call these (bf16_kernels() is false)

double peak_flops(int64_t) { return 0.0; }

at::Tensor gemm_pack_weight(const at::Tensor&, bool) {
  TORCH_CHECK(false, "the bf16 gemm needs a CPU with AVX2 or AVX-512");
  return {};
}
at::Tensor gemm(const at::Tensor&, const at::Tensor&, int64_t, const std::optional<at::Tensor>&, bool,
                const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "the bf16 gemm needs a CPU with AVX2 or AVX-512");
  return {};
}
at::Tensor gemm_pack_weight_f32(const at::Tensor&, bool) {
  TORCH_CHECK(false, "the fp32 gemm needs a CPU with AVX2 or AVX-512");
  return {};
}
at::Tensor gemm_f32(const at::Tensor&, const at::Tensor&, int64_t, const std::optional<at::Tensor>&, bool,
                    const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "the fp32 gemm needs a CPU with AVX2 or AVX-512");
  return {};
}

#endif
