// The AVX512-BF16 path (VDPBF16PS) of CPU verify attention: the QK and PV register tiles, and the
// row-split QK for few query rows. Included by verify_attention.cpp after verify_attention_bf16.h
// (path choice, Q and V packing, the layouts).
#pragma once

namespace {

#if VA_HAS_DPBF
// ------------------------------------------------------------------ AVX512-BF16 (VDPBF16PS)

// st[c][v*16 + lane] = sum_p sum_t k[c][2t..2t+1] . qp[p][t][v*16 + lane], c < KC, over the qparts
// parts of Q (T pairs each).
template <int MV, int KC>
inline void dpbf_qk_tile(const uint16_t* __restrict k, int64_t ldk, const uint32_t* __restrict qp, int64_t Mp,
                         int64_t T, int qparts, float* __restrict st, int64_t lds, Prefetch& pf) {
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
#pragma GCC unroll 32
  for (int c = 0; c < KC; ++c)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(st + c * lds + v * 16, acc[c][v]);
}

template <int MV>
void dpbf_qk_block(const uint16_t* k, int64_t ldk, bool padded, int64_t nc, const uint32_t* qp, int64_t Mp,
                   int64_t T, int qparts, float* st, Prefetch& pf) {
  constexpr int KC = NACC / MV;
  const int64_t lds = MV * 16;
  int64_t c = 0;
  for (; c + KC <= nc; c += KC) dpbf_qk_tile<MV, KC>(k + c * ldk, ldk, qp, Mp, T, qparts, st + c * lds, lds, pf);
  if (c < nc) {  // padded rows are zero; else a last tile ending at nc (nc >= KC here)
    if (!padded) c = nc - KC;
    dpbf_qk_tile<MV, KC>(k + c * ldk, ldk, qp, Mp, T, qparts, st + c * lds, lds, pf);
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

// PV of one row block: P pairs pp[t][m] (t < ceil(nc/2)) from the softmax's st, then the tiles.
void dpbf_pv(const float* st, int64_t Mb, int64_t rows, int64_t nc, const uint32_t* vv, int64_t Dv,
             const float* alpha, float* o, uint32_t* pp, Prefetch& pf) {
  const int64_t pairs = (nc + 1) / 2;
  for (int64_t t = 0; t < pairs; ++t)
    for (int64_t m0 = 0; m0 < Mb; m0 += 16) {
      _mm512_storeu_si512(pp + t * Mb + m0, bf16_pairs(st_row(st, Mb, 2 * t, nc, m0), st_row(st, Mb, 2 * t + 1, nc, m0)));
    }
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
// lanes in four), so, as the fp32 path's row-split QK does (verify_attention_fp32.h), lane m*R + j
// accumulates the pairs u*R + j of row m, R = 16/Mq lanes a row (Mq = M rounded up to a power of
// two): K arrives as R consecutive pairs repeated Mq times, Q as
//   qx [parts][T/R][16]   qx[p][u][m*R + j] = qp[p][u*R + j][m]
// and each key's Mq row sums, scaled, are stored packed at st[c*Mq + m] for softmax_packed.

// qx from pack_q's qp (T pairs, Mp columns a part).
void pack_qx(const uint32_t* qp, int qparts, int64_t T, int64_t Mp, int64_t M, int R, uint32_t* qx) {
  const int64_t Mq = W / R;
  for (int p = 0; p < qparts; ++p)
    for (int64_t u = 0; u < T / R; ++u)
      for (int64_t m = 0; m < Mq; ++m)
        for (int j = 0; j < R; ++j)
          qx[(p * (T / R) + u) * W + m * R + j] = m < M ? qp[(p * T + u * R + j) * Mp + m] : 0u;
}

template <int R> inline __m512i kpairs(const uint16_t* p);  // R pairs (2R bf16) at p, repeated 16/R times
template <> inline __m512i kpairs<2>(const uint16_t* p) {
  long long d;
  std::memcpy(&d, p, 8);
  return _mm512_set1_epi64(d);
}
template <> inline __m512i kpairs<4>(const uint16_t* p) {
  return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <> inline __m512i kpairs<8>(const uint16_t* p) {
  return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <> inline __m512i kpairs<16>(const uint16_t* p) { return _mm512_loadu_si512(p); }

template <int R, int KC>
inline void dpbf_qk_tile_split(const uint16_t* __restrict k, int64_t ldk, const uint32_t* __restrict qx, int64_t T,
                               int qparts, __m512 sc, float* __restrict st, Prefetch& pf) {
  constexpr int Mq = 16 / R;
  __m512 acc[KC];
#pragma GCC unroll 32
  for (int c = 0; c < KC; ++c) acc[c] = _mm512_setzero_ps();
  for (int p = 0; p < qparts; ++p) {
    const uint32_t* __restrict qxp = qx + p * T * Mq;
    for (int64_t u = 0; u < T / R; ++u) {
      if ((u & 7) == 0) pf.step(KC * 8);
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(qxp + u * 16);
#pragma GCC unroll 32
      for (int c = 0; c < KC; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], (__m512bh)kpairs<R>(k + c * ldk + 2 * u * R), qv);
    }
  }
#pragma GCC unroll 32
  for (int c = 0; c < KC; ++c)
    _mm512_mask_storeu_ps(st + c * Mq, __mmask16((1u << Mq) - 1), _mm512_mul_ps(group_sums<R>(acc[c]), sc));
}

template <int R>
void dpbf_qk_split_block(const uint16_t* k, int64_t ldk, bool padded, int64_t nc, const uint32_t* qx, int64_t T,
                         int qparts, float scale, float* st, Prefetch& pf) {
  constexpr int KC = NACC, Mq = 16 / R;
  const __m512 sc = _mm512_set1_ps(scale);
  int64_t c = 0;
  for (; c + KC <= nc; c += KC) dpbf_qk_tile_split<R, KC>(k + c * ldk, ldk, qx, T, qparts, sc, st + c * Mq, pf);
  if (c < nc) {  // padded rows are zero; else a last tile ending at nc (nc >= KC here)
    if (!padded) c = nc - KC;
    dpbf_qk_tile_split<R, KC>(k + c * ldk, ldk, qx, T, qparts, sc, st + c * Mq, pf);
  }
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

// PV of the row-split layout: P pairs pp[t*Mq + m] = (P[m][2t], P[m][2t+1]) rounded to bf16 from
// softmax_packed's probabilities st[c*Mq + m] (zero past nc), then the M rows' tiles.
void dpbf_pv_split(const float* st, int64_t Mq, int64_t rows, int64_t nc, const uint32_t* vv, int64_t Dv,
                   const float* alpha, float* o, uint32_t* pp, Prefetch& pf) {
  alignas(32) uint16_t idx[16];  // dword i = t*Mq + m of a vector's 8: keys 2t and 2t+1 of row m
  for (int i = 0; i < 8; ++i) {
    const int t = i / int(Mq), m = i % int(Mq);
    idx[2 * i] = uint16_t(2 * t * Mq + m);
    idx[2 * i + 1] = uint16_t((2 * t + 1) * Mq + m);
  }
  const __m256i ix = _mm256_load_si256(reinterpret_cast<const __m256i*>(idx));
  const int64_t nv = (nc * Mq + W - 1) / W, pairs = (nc + 1) / 2;
  for (int64_t v = 0; v < nv; ++v) {
    const __m256i b = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(st + v * W));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pp + v * 8), _mm256_permutexvar_epi16(ix, b));
  }
  for (int64_t g0 = 0; g0 < Dv / 16; g0 += 4) {
    switch (std::min<int64_t>(4, Dv / 16 - g0)) {
      case 4: dpbf_pv_cols<4>(rows, pp, Mq, pairs, vv + g0 * 16, Dv, alpha, o + g0 * 16, pf); break;
      case 3: dpbf_pv_cols<3>(rows, pp, Mq, pairs, vv + g0 * 16, Dv, alpha, o + g0 * 16, pf); break;
      case 2: dpbf_pv_cols<2>(rows, pp, Mq, pairs, vv + g0 * 16, Dv, alpha, o + g0 * 16, pf); break;
      default: dpbf_pv_cols<1>(rows, pp, Mq, pairs, vv + g0 * 16, Dv, alpha, o + g0 * 16, pf); break;
    }
  }
}
#else
void pack_qx(const uint32_t*, int, int64_t, int64_t, int64_t, int, uint32_t*) {}  // never called: R is 0
void dpbf_qk_split(int, const uint16_t*, int64_t, bool, int64_t, const uint32_t*, int64_t, int, float, float*,
                   Prefetch&) {}
void dpbf_pv_split(const float*, int64_t, int64_t, int64_t, const uint32_t*, int64_t, const float*, float*,
                   uint32_t*, Prefetch&) {}
#endif  // VA_HAS_DPBF

// Lanes a row of the AVX512-BF16 row-split QK (0: the plain tiles): M <= 8 rows, not disabled by
// flags bit 1.
inline int dpbf_split_lanes(const Args& a) {
  if (!VA_HAS_DPBF || a.path != PATH_DPBF || (a.flags & 2) || a.M > W / 2) return 0;
  int mq = 1;
  while (mq < a.M) mq *= 2;
  return W / mq;
}

}  // namespace
