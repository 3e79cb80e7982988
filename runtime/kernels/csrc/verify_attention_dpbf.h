// The AVX512-BF16 path (VDPBF16PS) of CPU verify attention: the QK and PV register tiles, and the
// row-split QK for few query rows. Included by verify_attention.cpp after verify_attention_bf16.h
// (path choice, Q and V packing, the layouts).
#pragma once

namespace {

struct FusedP;  // the softmax fused into QK (below; AVX512-BF16 builds only)

#if VA_HAS_DPBF
// ------------------------------------------------------------------ AVX512-BF16: V pairs
// The pairs of keys 2t and 2t+1 (ODD: key 2t+1 is past the chunk, zero) for the 32 d from d0 (m: the
// d < D), V rows D apart (F16: fp16, converted), as two unpacks: A holds d0 + 8L + j at lane 4L + j, B
// d0 + 8L + 4 + j (L, j < 4). One instruction each where a permute into d order costs three on Zen 4;
// the PV accumulators keep this order and unpermute_rows puts each finished row back into d order.
template <bool ODD, bool F16>
inline void v_pairs(const uint16_t* v, int64_t D, __mmask32 m, int64_t t, int64_t d0, __m512i& A, __m512i& B) {
  const __m512i x = load32<F16>(v + 2 * t * D + d0, m);
  const __m512i y = ODD ? _mm512_setzero_si512() : load32<F16>(v + (2 * t + 1) * D + d0, m);
  A = _mm512_unpacklo_epi16(x, y);
  B = _mm512_unpackhi_epi16(x, y);
}

// out[m][0..D) = row m of o (Dv floats a row, each 32 in v_pairs' order) in d order.
void unpermute_rows(const float* o, int64_t M, int64_t Dv, int64_t D, float* out) {
  alignas(64) int32_t i0[16], i1[16];  // lane i of d0+i (i1: d0+16+i) in A (0..15) or B (16..31)
  for (int i = 0; i < 16; ++i) {
    i0[i] = (i % 8 < 4 ? 0 : 16) + 4 * (i / 8) + i % 4;
    i1[i] = (i % 8 < 4 ? 0 : 16) + 4 * (2 + i / 8) + i % 4;
  }
  const __m512i x0 = _mm512_load_si512(i0), x1 = _mm512_load_si512(i1);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      const __m512 A = _mm512_loadu_ps(o + m * Dv + d0), B = _mm512_loadu_ps(o + m * Dv + d0 + 16);
      const int64_t n = D - d0;
      _mm512_mask_storeu_ps(out + m * D + d0, __mmask16(n >= 16 ? 0xFFFF : (1u << n) - 1), _mm512_permutex2var_ps(A, x0, B));
      if (n > 16)
        _mm512_mask_storeu_ps(out + m * D + d0 + 16, __mmask16(n >= 32 ? 0xFFFF : (1u << (n - 16)) - 1),
                              _mm512_permutex2var_ps(A, x1, B));
    }
}

// ------------------------------------------------------------------ AVX512-BF16 (VDPBF16PS)

// The softmax in the QK tiles' epilogue, for a chunk whose keys every row sees: each score becomes its
// probability against the rows' running maximum so far (mref) instead of the chunk's own, stored as
// the P pairs PV multiplies, with no score stored and read back and no pass for the chunk's maximum.
// The maximum is kept (so the output needs no rescale) unless a row's sum over the chunk exceeds
// MAX_SUM, which bounds every probability by it (as FlashAttention-4 bounds them by 2^8): fp32 holds
// such sums over any context. Past it the caller redoes the chunk with the exact softmax.
struct FusedP {
  static constexpr float MAX_SUM = 65536.0f;
  __m512 sc;              // the scores' scale (> 0)
  const float* mref;      // [Mb] the rows' running maximum (finite), scaled
  float* sum;             // [Mb] += each row's sum of the chunk's probabilities
  uint32_t* pp;           // [pairs][Mb] P pairs, pp[t][m] = (p[2t][m], p[2t+1][m]) in bf16
};

// The probabilities of a tile's KC keys (KC even, the tile's first key c even) x MV vectors of rows.
template <int MV, int KC>
inline void dpbf_fused_epilogue(const __m512 (&acc)[KC][MV], int64_t c, int64_t ld, const FusedP& f) {
#pragma GCC unroll 4
  for (int v = 0; v < MV; ++v) {
    const __m512 ms = _mm512_loadu_ps(f.mref + v * 16);
    __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int j = 0; j < KC; j += 2) {
      const __m512 px = exp2_bf16<true>(_mm512_fmsub_ps(acc[j][v], f.sc, ms));
      const __m512 py = exp2_bf16<true>(_mm512_fmsub_ps(acc[j + 1][v], f.sc, ms));
      sum = _mm512_add_ps(sum, _mm512_add_ps(px, py));
      _mm512_storeu_si512(f.pp + (c + j) / 2 * ld + v * 16, bf16_pairs(px, py));
    }
    _mm512_storeu_ps(f.sum + v * 16, _mm512_add_ps(_mm512_loadu_ps(f.sum + v * 16), sum));
  }
}

// st[c][v*16 + lane] = sum_p sum_t k[c][2t..2t+1] . qp[p][t][v*16 + lane], c < KC, over the qparts
// parts of Q (T pairs each); FUSE: instead the epilogue above (the tile's first key key0).
template <int MV, int KC, bool FUSE>
inline void dpbf_qk_tile(const uint16_t* __restrict k, int64_t ldk, const uint32_t* __restrict qp, int64_t Mp,
                         int64_t T, int qparts, float* __restrict st, int64_t lds, Prefetch& pf, FusedP* f = nullptr,
                         int64_t key0 = 0) {
  __m512 acc[KC][MV];
#pragma GCC unroll 32
  for (int c = 0; c < KC; ++c)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) acc[c][v] = _mm512_setzero_ps();
  for (int p = 0; p < qparts; ++p) {
    const uint32_t* __restrict qpp = qp + p * T * Mp;
    for (int64_t t = 0; t < T; ++t) {
      if ((t & 7) == 0) pf.step(KC * MV * 8);
      __m512bh qv[MV];
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) qv[v] = (__m512bh)_mm512_loadu_si512(qpp + t * Mp + v * 16);
#pragma GCC unroll 32
      for (int c = 0; c < KC; ++c) {
        uint32_t kk;
        std::memcpy(&kk, k + c * ldk + 2 * t, 4);
        const __m512bh kb = (__m512bh)_mm512_set1_epi32(int(kk));
#pragma GCC unroll 4
        for (int v = 0; v < MV; ++v) acc[c][v] = _mm512_dpbf16_ps(acc[c][v], kb, qv[v]);
      }
    }
  }
  if (FUSE) return dpbf_fused_epilogue<MV, KC>(acc, key0, lds, *f);
#pragma GCC unroll 32
  for (int j = 0; j < KC; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(st + j * lds + v * 16, acc[j][v]);
}

// The scores st [nc][MV*16] of a chunk, or (f set: nc a multiple of KC) its P pairs (FusedP).
template <int MV>
void dpbf_qk_block(const uint16_t* k, int64_t ldk, bool padded, int64_t nc, const uint32_t* qp, int64_t Mp,
                   int64_t T, int qparts, float* st, Prefetch& pf, FusedP* f) {
  constexpr int KC = NACC / MV;
  const int64_t lds = MV * 16;
  int64_t c = 0;
  if (f) {
    for (; c < nc; c += KC) dpbf_qk_tile<MV, KC, true>(k + c * ldk, ldk, qp, Mp, T, qparts, st, lds, pf, f, c);
    return;
  }
  for (; c + KC <= nc; c += KC) dpbf_qk_tile<MV, KC, false>(k + c * ldk, ldk, qp, Mp, T, qparts, st + c * lds, lds, pf);
  if (c < nc) {  // padded rows are zero; else a last tile ending at nc (nc >= KC here)
    if (!padded) c = nc - KC;
    dpbf_qk_tile<MV, KC, false>(k + c * ldk, ldk, qp, Mp, T, qparts, st + c * lds, lds, pf);
  }
}

// o[r][g0*16 ..] = o*alpha + sum_t P pair (r, t) . vv[t][..], MR rows x G vectors of 16 d.
template <int MR, int G>
inline void dpbf_pv_tile(const uint32_t* __restrict pp, int64_t ldp, int64_t pairs, const uint32_t* __restrict vv,
                         int64_t Dv, const float* alpha, float* __restrict o, Prefetch& pf) {
  __m512 acc[MR][G];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < G; ++j) acc[r][j] = _mm512_mul_ps(_mm512_loadu_ps(o + r * Dv + j * 16), _mm512_set1_ps(alpha[r]));
  for (int64_t t = 0; t < pairs; ++t) {
    if ((t & 7) == 0) pf.step(8 * MR * G);
    __m512bh vb[G];
#pragma GCC unroll 4
    for (int j = 0; j < G; ++j) vb[j] = (__m512bh)_mm512_loadu_si512(vv + t * Dv + j * 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(int(pp[t * ldp + r]));
#pragma GCC unroll 4
      for (int j = 0; j < G; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], pb, vb[j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < G; ++j) _mm512_storeu_ps(o + r * Dv + j * 16, acc[r][j]);
}

template <int G>
void dpbf_pv_cols(int64_t rows, const uint32_t* pp, int64_t ldp, int64_t pairs, const uint32_t* vv, int64_t Dv,
                  const float* alpha, float* o, Prefetch& pf) {
  constexpr int MR = NACC / G > 6 ? 6 : NACC / G;
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) dpbf_pv_tile<MR, G>(pp + r, ldp, pairs, vv, Dv, alpha + r, o + r * Dv, pf);
  switch (rows - r) {
    case 0: return;
    case 1: return dpbf_pv_tile<1, G>(pp + r, ldp, pairs, vv, Dv, alpha + r, o + r * Dv, pf);
    case 2: return dpbf_pv_tile<2, G>(pp + r, ldp, pairs, vv, Dv, alpha + r, o + r * Dv, pf);
    case 3: return dpbf_pv_tile<3, G>(pp + r, ldp, pairs, vv, Dv, alpha + r, o + r * Dv, pf);
    case 4: return dpbf_pv_tile<4, G>(pp + r, ldp, pairs, vv, Dv, alpha + r, o + r * Dv, pf);
    default: return dpbf_pv_tile<5, G>(pp + r, ldp, pairs, vv, Dv, alpha + r, o + r * Dv, pf);
  }
}

// The softmax's probabilities of the 16 rows of vector v as the P pairs PV multiplies, with no fp32
// store and re-read: pp[t][v*16 + lane] = (p[2t], p[2t+1]) rounded to bf16, p[c] = 2^(st[c][m] * sc -
// ms[m]) for c < nc, zero from nc on. Returns the fp32 sum over c of each row's p.
inline __m512 dpbf_exp_pack(const float* st, int64_t Mb, int64_t v, int64_t nc, __m512 sc, __m512 ms, uint32_t* pp) {
  auto prob = [&](int64_t c) { return exp2_bf16(_mm512_fmsub_ps(_mm512_loadu_ps(st + c * Mb + v * 16), sc, ms)); };
  __m512 sum = _mm512_setzero_ps();
  int64_t t = 0;
  for (; 2 * t + 1 < nc; ++t) {
    const __m512 x = prob(2 * t), y = prob(2 * t + 1);
    sum = _mm512_add_ps(sum, _mm512_add_ps(x, y));
    _mm512_storeu_si512(pp + t * Mb + v * 16, bf16_pairs(x, y));
  }
  if (2 * t < nc) {
    const __m512 x = prob(2 * t);
    sum = _mm512_add_ps(sum, x);
    _mm512_storeu_si512(pp + t * Mb + v * 16, bf16_pairs(x, _mm512_setzero_ps()));
  }
  return sum;
}

// PV of one row block: P pairs pp[t][m] (t < ceil(nc/2)) from dpbf_exp_pack, then the tiles.
void dpbf_pv(int64_t Mb, int64_t rows, int64_t nc, const uint32_t* vv, int64_t Dv, const float* alpha, float* o,
             const uint32_t* pp, Prefetch& pf) {
  const int64_t pairs = (nc + 1) / 2;
  for (int64_t g0 = 0; g0 < Dv / 16; g0 += 4) {
    switch (std::min<int64_t>(4, Dv / 16 - g0)) {
      case 4: dpbf_pv_cols<4>(rows, pp, Mb, pairs, vv + g0 * 16, Dv, alpha, o + g0 * 16, pf); break;
      case 3: dpbf_pv_cols<3>(rows, pp, Mb, pairs, vv + g0 * 16, Dv, alpha, o + g0 * 16, pf); break;
      case 2: dpbf_pv_cols<2>(rows, pp, Mb, pairs, vv + g0 * 16, Dv, alpha, o + g0 * 16, pf); break;
      default: dpbf_pv_cols<1>(rows, pp, Mb, pairs, vv + g0 * 16, Dv, alpha, o + g0 * 16, pf); break;
    }
  }
}

// ------------------------------------------------------------------ AVX512-BF16, row-split QK
// For M <= 8 query rows a vector of 16 query rows would be mostly padding (k+1 = 1 at g = 4: three
// lanes in four), so each row's dot products are split over lanes instead (Mq = M rounded up to a
// power of two, R = 16/Mq), with each key's Mq row sums, scaled, stored packed at st[c*Mq + m] for
// softmax_packed. Two layouts:
//   R = 2 (Mq = 8): as the fp32 path's row-split QK (verify_attention_fp32.h), lane m*2 + j
//     accumulates pairs 2u + j of row m: K arrives as two pairs broadcast (a 64-bit broadcast is
//     free), Q as qx [parts][T/2][16], qx[p][u][m*2 + j] = qp[p][2u + j][m]; 24 keys a tile.
//   R >= 4 (Mq <= 4): one accumulator per (key, row), its lanes the 16 pairs that 64 bytes of the
//     K row and 64 bytes of the Q row hold side by side, so K is a plain load (the R = 4 layout
//     above would broadcast 128 bits of K per dot product, which costs two of them here); Q as
//     qx [parts][Mq][T], qx[p][m][t] = qp[p][t][m]; 16/Mq keys a tile, whose 16 sums come out of
//     sums16 in the order st wants. k+1 = 1: 1.02-1.05x at g = 4 (M = 4), 1.19-1.27x at g = 1,
//     1.07-1.10x at g = 2, from DRAM; 1.13x with the KV in L3. At Mq = 8 it was 0.75-0.81x. The
//     fp32 path's row split done the same way was 0.91-1.04x (memory-bound there), so it keeps
//     its group broadcasts.

// qx from pack_q's qp (T pairs, Mp columns a part, zero past M) in the layout for R: one gather of
// 16 pairs per store.
void pack_qx(const uint32_t* qp, int qparts, int64_t T, int64_t Mp, int R, uint32_t* qx) {
  const int64_t Mq = W / R;
  alignas(64) int32_t idx[16];  // R = 2: lane m*2 + j, pair 2u + j of column m; else lane j, pair j of a column
  for (int lane = 0; lane < 16; ++lane) idx[lane] = R == 2 ? int32_t((lane % 2) * Mp + lane / 2) : int32_t(lane * Mp);
  const __m512i vi = _mm512_load_si512(idx);
  for (int p = 0; p < qparts; ++p) {
    if (R == 2) {
      for (int64_t u = 0; u < T / 2; ++u)
        _mm512_storeu_si512(qx + (p * (T / 2) + u) * W, _mm512_i32gather_epi32(vi, qp + (p * T + u * 2) * Mp, 4));
      continue;
    }
    for (int64_t m = 0; m < Mq; ++m)
      for (int64_t t = 0; t < T; t += 16)
        _mm512_storeu_si512(qx + (p * Mq + m) * T + t, _mm512_i32gather_epi32(vi, qp + (p * T + t) * Mp + m, 4));
  }
}

// R = 2: KC keys, each key's two broadcast pairs against 8 rows' two lanes.
template <int KC>
inline void dpbf_qk_tile_r2(const uint16_t* __restrict k, int64_t ldk, const uint32_t* __restrict qx, int64_t T,
                            int qparts, __m512 sc, float* __restrict st, Prefetch& pf) {
  __m512 acc[KC];
#pragma GCC unroll 32
  for (int c = 0; c < KC; ++c) acc[c] = _mm512_setzero_ps();
  for (int p = 0; p < qparts; ++p) {
    const uint32_t* __restrict qxp = qx + p * T * 8;
    for (int64_t u = 0; u < T / 2; ++u) {
      if ((u & 7) == 0) pf.step(KC * 8);
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(qxp + u * 16);
#pragma GCC unroll 32
      for (int c = 0; c < KC; ++c) {
        long long two;  // pairs 2u, 2u+1 of key c
        std::memcpy(&two, k + c * ldk + 4 * u, 8);
        acc[c] = _mm512_dpbf16_ps(acc[c], (__m512bh)_mm512_set1_epi64(two), qv);
      }
    }
  }
#pragma GCC unroll 32
  for (int c = 0; c < KC; ++c) _mm512_mask_storeu_ps(st + c * 8, __mmask16(0xFF), _mm512_mul_ps(group_sums<2>(acc[c]), sc));
}

// The sums of 16 vectors: lane 4j + e = the sum of v[4e + j]'s lanes (sums16_at gives the input for
// an output lane). Four rounds, each adding two shuffles of a pair of vectors: 128-bit blocks
// (vshuff32x4) in the first two, floats within each block (vshufps) in the last two; 30 shuffles
// and 15 adds, no index vectors held in registers and no operand overwritten (vpermt2ps would hold
// eight index vectors and copy an operand per permute, which spills the tile's Q rows). v is overwritten.
constexpr int sums16_at(int lane) { return lane % 4 * 4 + lane / 4; }
__attribute__((always_inline)) inline __m512 sums16(__m512* v) {
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // blocks 0-1: v[2i]'s halves summed, blocks 2-3: v[2i+1]'s
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)  // block j: 4 partial sums of v[4i + j]
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xDD));
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)  // block j: 2 each of v[8i + j], v[8i + 4 + j]
    v[i] = _mm512_add_ps(_mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], 0x88), _mm512_shuffle_ps(v[0], v[1], 0xDD));
}

// R >= 4: 16/Mq keys x Mq rows, key c and row m summed into lane c*Mq + m (the order st wants).
template <int Mq>
inline void dpbf_qk_tile_rows(const uint16_t* __restrict k, int64_t ldk, const uint32_t* __restrict qx, int64_t T,
                              int qparts, __m512 sc, float* __restrict st, Prefetch& pf) {
  constexpr int KC = 16 / Mq;
  __m512 acc[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int p = 0; p < qparts; ++p) {
    const uint32_t* __restrict qxp = qx + p * Mq * T;
    for (int64_t t = 0; t < T; t += 16) {
      pf.step(16);
      __m512bh qv[Mq];
#pragma GCC unroll 4
      for (int m = 0; m < Mq; ++m) qv[m] = (__m512bh)_mm512_loadu_si512(qxp + m * T + t);
#pragma GCC unroll 16
      for (int c = 0; c < KC; ++c) {
        const __m512bh kv = (__m512bh)_mm512_loadu_si512(k + c * ldk + 2 * t);
#pragma GCC unroll 4
        for (int m = 0; m < Mq; ++m) acc[sums16_at(c * Mq + m)] = _mm512_dpbf16_ps(acc[sums16_at(c * Mq + m)], kv, qv[m]);
      }
    }
  }
  _mm512_storeu_ps(st, _mm512_mul_ps(sums16(acc), sc));
}

template <int R>
void dpbf_qk_split_block(const uint16_t* k, int64_t ldk, bool padded, int64_t nc, const uint32_t* qx, int64_t T,
                         int qparts, float scale, float* st, Prefetch& pf) {
  constexpr int KC = R == 2 ? NACC : R, Mq = 16 / R;  // keys a tile (fast_units counts their steps)
  const __m512 sc = _mm512_set1_ps(scale);
  auto tile = [&](int64_t c) {
    if constexpr (R == 2) dpbf_qk_tile_r2<KC>(k + c * ldk, ldk, qx, T, qparts, sc, st + c * Mq, pf);
    else dpbf_qk_tile_rows<Mq>(k + c * ldk, ldk, qx, T, qparts, sc, st + c * Mq, pf);
  };
  int64_t c = 0;
  for (; c + KC <= nc; c += KC) tile(c);
  if (c < nc) tile(padded ? c : nc - KC);  // padded rows are zero; else a last tile ending at nc (nc >= NACC here)
}

// Scaled scores st[c*Mq + m] of the chunk's nc keys (K rows k, ldk apart; D padded to 2T when padded).
void dpbf_qk_split(int R, const uint16_t* k, int64_t ldk, bool padded, int64_t nc, const uint32_t* qx, int64_t T,
                   int qparts, float scale, float* st, Prefetch& pf) {
  switch (R) {
    case 2: return dpbf_qk_split_block<2>(k, ldk, padded, nc, qx, T, qparts, scale, st, pf);
    case 4: return dpbf_qk_split_block<4>(k, ldk, padded, nc, qx, T, qparts, scale, st, pf);
    case 8: return dpbf_qk_split_block<8>(k, ldk, padded, nc, qx, T, qparts, scale, st, pf);
    default: return dpbf_qk_split_block<16>(k, ldk, padded, nc, qx, T, qparts, scale, st, pf);
  }
}

// o[r] = o[r]*alpha[r] + P . V for MR rows, each 32 d at a time, V paired as it is read (v_pairs)
// from the chunk's rows in the cache: one pass over V. P pairs pp[t*ldp + r]. PACK: the pairs are also
// stored, vv[t][d0 .. d0+32) = A, B (t < ceil(nc/2)), for the rows that dpbf_pv multiplies after.
// The loop over pairs holds no test of the KV dtype or the row bounds: with them it ran 10-20% slower
// or not, depending on where the code landed.
template <int MR, bool PACK, bool F16>
void dpbf_pv_direct(const uint32_t* pp, int64_t ldp, int64_t nc, const uint16_t* v, int64_t D, int64_t Dv,
                    const float* alpha, float* o, Prefetch& pf, uint32_t* vv = nullptr) {
  const int64_t full = nc / 2;  // pairs of two keys; an odd nc leaves one more, paired with zero
  for (int64_t d0 = 0; d0 < Dv; d0 += 32) {
    __m512 acc[MR][2];
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 al = _mm512_set1_ps(alpha[r]);
      acc[r][0] = _mm512_mul_ps(_mm512_loadu_ps(o + r * Dv + d0), al);
      acc[r][1] = _mm512_mul_ps(_mm512_loadu_ps(o + r * Dv + d0 + 16), al);
    }
    const __mmask32 m = first32(D - d0);
    auto pair = [&](int64_t t, __m512i A, __m512i B) __attribute__((always_inline)) {
      if ((t & 7) == 0) pf.step(8 * MR * 2);
      if (PACK) {
        _mm512_storeu_si512(vv + t * Dv + d0, A);
        _mm512_storeu_si512(vv + t * Dv + d0 + 16, B);
      }
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) {
        const __m512bh pb = (__m512bh)_mm512_set1_epi32(int(pp[t * ldp + r]));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], pb, (__m512bh)A);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], pb, (__m512bh)B);
      }
    };
    __m512i A, B;
    for (int64_t t = 0; t < full; ++t) {
      v_pairs<false, F16>(v, D, m, t, d0, A, B);
      pair(t, A, B);
    }
    if (nc & 1) {
      v_pairs<true, F16>(v, D, m, full, d0, A, B);
      pair(full, A, B);
    }
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      _mm512_storeu_ps(o + r * Dv + d0, acc[r][0]);
      _mm512_storeu_ps(o + r * Dv + d0 + 16, acc[r][1]);
    }
  }
}

// PV of a row block's rows (P pairs pp[t*ldp + r]) with V paired as it is read: tiles of up to
// NACC / 2 rows, each a pass over the chunk's V rows.
template <bool F16>
void dpbf_pv_rows(const uint32_t* pp, int64_t ldp, int64_t rows, int64_t nc, const uint16_t* v, int64_t D, int64_t Dv,
                  const float* alpha, float* o, Prefetch& pf) {
  constexpr int MR = NACC / 2;
  static_assert(MR == 12, "the tails below");
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) dpbf_pv_direct<MR, false, F16>(pp + r, ldp, nc, v, D, Dv, alpha + r, o + r * Dv, pf);
  const uint32_t* p = pp + r;
  const float* al = alpha + r;
  float* ob = o + r * Dv;
  switch (rows - r) {
    case 0: return;
    case 1: return dpbf_pv_direct<1, false, F16>(p, ldp, nc, v, D, Dv, al, ob, pf);
    case 2: return dpbf_pv_direct<2, false, F16>(p, ldp, nc, v, D, Dv, al, ob, pf);
    case 3: return dpbf_pv_direct<3, false, F16>(p, ldp, nc, v, D, Dv, al, ob, pf);
    case 4: return dpbf_pv_direct<4, false, F16>(p, ldp, nc, v, D, Dv, al, ob, pf);
    case 5: return dpbf_pv_direct<5, false, F16>(p, ldp, nc, v, D, Dv, al, ob, pf);
    case 6: return dpbf_pv_direct<6, false, F16>(p, ldp, nc, v, D, Dv, al, ob, pf);
    case 7: return dpbf_pv_direct<7, false, F16>(p, ldp, nc, v, D, Dv, al, ob, pf);
    case 8: return dpbf_pv_direct<8, false, F16>(p, ldp, nc, v, D, Dv, al, ob, pf);
    case 9: return dpbf_pv_direct<9, false, F16>(p, ldp, nc, v, D, Dv, al, ob, pf);
    case 10: return dpbf_pv_direct<10, false, F16>(p, ldp, nc, v, D, Dv, al, ob, pf);
    default: return dpbf_pv_direct<11, false, F16>(p, ldp, nc, v, D, Dv, al, ob, pf);
  }
}

// PV of one row block of the plain tiles. V (kv 1: bf16, 2: fp16) is read from the cache once a chunk,
// by the first tile of the first block (vv_ready false): that tile pairs it as it reads it and, where
// rows remain, stores the pairs in vv for them and for the later blocks (a first block of 12 rows or
// fewer is the only one: with more than 64 rows the first block has 64). Measured on Zen 4 (KV from
// DRAM) against packing V in a pass of its own before the tiles: 1.02-1.06x at k+1 = 16 and
// 1.03-1.12x at k+1 = 4-8 (g = 4); against every tile pairing V as it reads it, 1.02-1.06x at M = 16
// and 32.
void dpbf_pv_block(int64_t Mb, int64_t rows, int64_t nc, const uint16_t* v, int64_t D, int kv, int64_t Dv,
                   const float* alpha, float* o, const uint32_t* pp, uint32_t* vv, bool vv_ready, Prefetch& pf) {
  constexpr int MR = NACC / 2;
  if (vv_ready) return dpbf_pv(Mb, rows, nc, vv, Dv, alpha, o, pp, pf);
  if (rows <= MR)
    return kv == 2 ? dpbf_pv_rows<true>(pp, Mb, rows, nc, v, D, Dv, alpha, o, pf)
                   : dpbf_pv_rows<false>(pp, Mb, rows, nc, v, D, Dv, alpha, o, pf);
  if (kv == 2)
    dpbf_pv_direct<MR, true, true>(pp, Mb, nc, v, D, Dv, alpha, o, pf, vv);
  else
    dpbf_pv_direct<MR, true, false>(pp, Mb, nc, v, D, Dv, alpha, o, pf, vv);
  dpbf_pv(Mb, rows - MR, nc, vv, Dv, alpha + MR, o + MR * Dv, pp + MR, pf);
}

// The online softmax of the row-split layout's packed scores st (softmax_packed) with P written
// straight as the bf16 pairs PV multiplies, pp[t*Mq + m] = (P[m][2t], P[m][2t+1]), its 2^x at bf16
// precision (exp2_bf16); the row sums are of the unrounded fp32 probabilities. One pass instead of
// a pass for the fp32 probabilities and another to pair them.
void softmax_packed_pairs(float* st, int64_t nc, int64_t Mq, float* mrow, float* lrow, float* alpha, uint32_t* pp) {
  const __m512 msv = (__m512)packed_max(st, nc, Mq, mrow, alpha);
  alignas(32) uint16_t idx[16];  // dword i = t*Mq + m of a vector's 8: keys 2t and 2t+1 of row m
  for (int i = 0; i < 8; ++i) {
    const int t = i / int(Mq), m = i % int(Mq);
    idx[2 * i] = uint16_t(2 * t * Mq + m);
    idx[2 * i + 1] = uint16_t((2 * t + 1) * Mq + m);
  }
  const __m256i ix = _mm256_load_si256(reinterpret_cast<const __m256i*>(idx));
  const int64_t nv = (nc * Mq + W - 1) / W;
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < nv; ++i) {
    const __m512 p = exp2_bf16(_mm512_sub_ps(_mm512_loadu_ps(st + i * W), msv));
    sum = _mm512_add_ps(sum, p);
    const __m256i b = (__m256i)_mm512_cvtneps_pbh(p);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pp + i * 8), _mm256_permutexvar_epi16(ix, b));
  }
  packed_sums((vf)sum, Mq, alpha, lrow);
}

// PV of the row-split layout (M <= 8 rows) from softmax_packed_pairs' P pairs pp: dpbf_pv_rows.
void dpbf_pv_split(int64_t Mq, int64_t rows, int64_t nc, const uint16_t* v, int64_t D, int kv, int64_t Dv,
                   const float* alpha, float* o, const uint32_t* pp, Prefetch& pf) {
  if (kv == 2)
    dpbf_pv_rows<true>(pp, Mq, rows, nc, v, D, Dv, alpha, o, pf);
  else
    dpbf_pv_rows<false>(pp, Mq, rows, nc, v, D, Dv, alpha, o, pf);
}

#else
void pack_qx(const uint32_t*, int, int64_t, int64_t, int, uint32_t*) {}  // never called: R is 0
void dpbf_qk_split(int, const uint16_t*, int64_t, bool, int64_t, const uint32_t*, int64_t, int, float, float*,
                   Prefetch&) {}
void softmax_packed_pairs(float*, int64_t, int64_t, float*, float*, float*, uint32_t*) {}
void dpbf_pv_split(int64_t, int64_t, int64_t, const uint16_t*, int64_t, int, int64_t, const float*, float*,
                   const uint32_t*, Prefetch&) {}
void unpermute_rows(const float*, int64_t, int64_t, int64_t, float*) {}
#endif  // VA_HAS_DPBF

// Lanes a row of the AVX512-BF16 row-split QK (0: the plain tiles), as the fp32 path's split_lanes
// decides them; a row's dot product is over Dp (a multiple of 32) elements, which every R divides.
inline int dpbf_split_lanes(const Args& a) {
  return VA_HAS_DPBF && a.path == PATH_DPBF ? split_lanes(a.M, round_up(a.D, 32), a.flags) : 0;
}

}  // namespace
