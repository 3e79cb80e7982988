// The fp32 path of CPU verify attention (fp32 KV, and bf16 / fp16 KV widened to fp32): the
// register-tiled QK and PV, and the row-split QK for few query rows. Included by
// verify_attention.cpp after verify_attention_common.h.
#pragma once

namespace {

// st[c][mv*W + lane] = sum_d k[c*D + d] * qt[d*ldq + mv*W + lane], c < KC, for one row block.
// The d loop runs in steps of 16; each step prefetches one line per key row of K and V.
template <int DT, int MV, int KC>
inline void qk_tile(const float* __restrict k, int64_t Drt, const float* __restrict qt,
                    int64_t ldq, float* __restrict st, int64_t lds, Prefetch& pf) {
  const int64_t D = DT > 0 ? DT : Drt;
  vf acc[KC][MV];
#pragma GCC unroll 32
  for (int c = 0; c < KC; ++c)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) acc[c][v] = vf{};
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    pf.step(KC * MV * 16);
    const int64_t d1 = (DT > 0 && DT % 16 == 0) ? d0 + 16 : std::min<int64_t>(d0 + 16, D);
    for (int64_t d = d0; d < d1; ++d) {
      vf qv[MV];
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) qv[v] = vload(qt + d * ldq + v * W);
#pragma GCC unroll 32
      for (int c = 0; c < KC; ++c) {
        const vf kb = vsplat(k[c * D + d]);
#pragma GCC unroll 4
        for (int v = 0; v < MV; ++v) acc[c][v] += kb * qv[v];
      }
    }
  }
#pragma GCC unroll 32
  for (int c = 0; c < KC; ++c)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) vstore(st + c * lds + v * W, acc[c][v]);
}

// o[r][:] = o[r][:] * alpha[r] + sum_{c < nc} p[c*ldp + r] * v[c][:], r < MR (DT % W == 0).
template <int DT, int MR>
inline void pv_tile(const float* __restrict v, int64_t nc, const float* __restrict p,
                    int64_t ldp, const float* __restrict alpha, float* __restrict o, Prefetch& pf) {
  constexpr int DV = DT / W;
  constexpr int G = dvg_for(DV);
  for (int g0 = 0; g0 < DV; g0 += G) {
    vf acc[MR][G];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const vf a = vsplat(alpha[r]);
#pragma GCC unroll 8
      for (int j = 0; j < G; ++j) acc[r][j] = vload(o + r * DT + (g0 + j) * W) * a;
    }
    for (int64_t c = 0; c < nc; ++c) {
      if ((c & 7) == 0) pf.step(8 * MR * G);
      vf vv[G];
#pragma GCC unroll 8
      for (int j = 0; j < G; ++j) vv[j] = vload(v + c * DT + (g0 + j) * W);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const vf pb = vsplat(p[c * ldp + r]);
#pragma GCC unroll 8
        for (int j = 0; j < G; ++j) acc[r][j] += pb * vv[j];
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < G; ++j) vstore(o + r * DT + (g0 + j) * W, acc[r][j]);
  }
}

template <int DT>
constexpr int mr_for() { return DT > 0 ? NACC / dvg_for(DT / W) : 1; }

template <int DT, int MR>
inline void pv_rows_rem(int rem, const float* v, int64_t nc, const float* p, int64_t ldp,
                        const float* alpha, float* o, Prefetch& pf) {
  if constexpr (MR > 1) {
    if (rem == MR - 1) return pv_tile<DT, MR - 1>(v, nc, p, ldp, alpha, o, pf);
    return pv_rows_rem<DT, MR - 1>(rem, v, nc, p, ldp, alpha, o, pf);
  }
}

// Rows [0, rows) of one row block: PV for a compile-time D, runtime-D loop otherwise.
template <int DT>
inline void pv_rows(int64_t rows, int64_t D, const float* v, int64_t nc, const float* p,
                    int64_t ldp, const float* alpha, float* o, Prefetch& pf) {
  if constexpr (DT > 0 && DT % W == 0) {
    // Balanced row tiles (32 rows at MR = 6: 6,6,5,5,5,5 rather than 6,6,6,6,6,2).
    constexpr int MR = mr_for<DT>();
    const int64_t ntiles = (rows + MR - 1) / MR;
    const int64_t base = rows / ntiles, extra = rows % ntiles;
    int64_t r = 0;
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t mr = base + (t < extra ? 1 : 0);
      if (mr == MR)
        pv_tile<DT, MR>(v, nc, p + r, ldp, alpha + r, o + r * DT, pf);
      else
        pv_rows_rem<DT, MR>(int(mr), v, nc, p + r, ldp, alpha + r, o + r * DT, pf);
      r += mr;
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      float* orow = o + r * D;
      const float a = alpha[r];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) orow[d] *= a;
      for (int64_t c = 0; c < nc; ++c) {
        const float pc = p[c * ldp + r];
        if (pc == 0.0f) continue;
        const float* vrow = v + c * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) orow[d] += pc * vrow[d];
      }
    }
  }
}


template <int DT, int MV>
void qk_block(const Args& a, const float* kc, int64_t nc, bool direct, const float* qt, float* st,
              float* ktail, Prefetch& pf) {
  constexpr int KC = kc_for(MV);
  const int64_t D = DT > 0 ? DT : a.D;
  int64_t c = 0;
  // Full tiles straight from the source rows. The tail: a last tile that ends at key nc and
  // overlaps the one before (it recomputes the same scores bit for bit, nothing is copied), or
  // with fewer than KC keys in the chunk a zero-padded copy.
  if (direct) {
    for (; c + KC <= nc; c += KC)
      qk_tile<DT, MV, KC>(kc + c * D, D, qt, a.Mp, st + c * MV * W, MV * W, pf);
    if (c < nc && nc >= KC) {
      c = nc - KC;
      qk_tile<DT, MV, KC>(kc + c * D, D, qt, a.Mp, st + c * MV * W, MV * W, pf);
    } else if (c < nc) {
      std::memset(ktail, 0, sizeof(float) * KC * D);
      std::memcpy(ktail, kc + c * D, sizeof(float) * (nc - c) * D);
      qk_tile<DT, MV, KC>(ktail, D, qt, a.Mp, st + c * MV * W, MV * W, pf);
    }
  } else {  // kc is a buffer zero-padded to a multiple of NACC rows
    for (; c < nc; c += KC) qk_tile<DT, MV, KC>(kc + c * D, D, qt, a.Mp, st + c * MV * W, MV * W, pf);
  }
}

template <int DT>
void qk_dispatch(int mv, const Args& a, const float* kc, int64_t nc, bool direct, const float* qt,
                 float* st, float* ktail, Prefetch& pf) {
  switch (mv) {
    case 1: return qk_block<DT, 1>(a, kc, nc, direct, qt, st, ktail, pf);
    case 2: return qk_block<DT, 2>(a, kc, nc, direct, qt, st, ktail, pf);
    case 3: return qk_block<DT, 3>(a, kc, nc, direct, qt, st, ktail, pf);
    default: return qk_block<DT, 4>(a, kc, nc, direct, qt, st, ktail, pf);
  }
}

#if defined(__AVX512F__)
// Row-split QK for M <= 8 query rows (AVX-512). Lane m*R + j of a vector accumulates the terms
// d = t*R + j of row m, R = 16/Mq lanes per row (Mq = M rounded up to a power of two), so every
// lane does useful work where the plain tile would leave most lanes padding. K arrives as a
// group broadcast (R consecutive floats repeated 16/R times: a pure load), Q as the packed
// qx[t][m*R + j] = q[m][t*R + j]; a permute tree sums each row's R lanes per key at the end, and
// key c's Mq row sums are stored packed at st[c*Mq + m].
constexpr bool kHasSplitQK = true;
template <int R> inline __m512 kgroup(const float* p);
template <> inline __m512 kgroup<2>(const float* p) {
  double d;
  std::memcpy(&d, p, 8);
  return _mm512_castpd_ps(_mm512_set1_pd(d));
}
template <> inline __m512 kgroup<4>(const float* p) { return _mm512_broadcast_f32x4(_mm_loadu_ps(p)); }
template <> inline __m512 kgroup<8>(const float* p) {
  return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(reinterpret_cast<const double*>(p))));
}
template <> inline __m512 kgroup<16>(const float* p) { return _mm512_loadu_ps(p); }

// Sum of each group of R lanes, group m's sum in lane m, lanes >= 16/R zero.
template <int R>
inline __m512 group_sums(__m512 v) {
  if constexpr (R >= 16) v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));  // lane ^ 8
  if constexpr (R >= 8) v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));   // lane ^ 4
  if constexpr (R >= 4) v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4E));         // lane ^ 2
  v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));                                // lane ^ 1
  alignas(64) static const int32_t idx[16] = {0 * R % 16, 1 * R % 16, 2 * R % 16, 3 * R % 16,
                                              4 * R % 16, 5 * R % 16, 6 * R % 16, 7 * R % 16};
  return _mm512_maskz_permutexvar_ps(__mmask16((1u << (16 / R)) - 1), _mm512_load_si512(idx), v);
}

template <int DT, int R, int KC>
inline void qk_tile_split(const float* __restrict k, int64_t Drt, const float* __restrict qx,
                          float* __restrict st, Prefetch& pf) {
  const int64_t D = DT > 0 ? DT : Drt;
  __m512 acc[KC];
#pragma GCC unroll 32
  for (int c = 0; c < KC; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    pf.step(KC * 16 / R);
    const int64_t d1 = (DT > 0 && DT % 16 == 0) ? d0 + 16 : std::min<int64_t>(d0 + 16, D);
    for (int64_t d = d0; d < d1; d += R) {
      const __m512 qv = _mm512_loadu_ps(qx + d / R * 16);
#pragma GCC unroll 32
      for (int c = 0; c < KC; ++c) acc[c] = _mm512_fmadd_ps(kgroup<R>(k + c * D + d), qv, acc[c]);
    }
  }
#pragma GCC unroll 32
  for (int c = 0; c < KC; ++c) _mm512_mask_storeu_ps(st + c * (16 / R), __mmask16((1u << (16 / R)) - 1), group_sums<R>(acc[c]));
}

template <int DT, int R>
void qk_block_split(const Args& a, const float* kc, int64_t nc, bool direct, const float* qx, float* st,
                    float* ktail, Prefetch& pf) {
  constexpr int KC = NACC;
  const int64_t D = DT > 0 ? DT : a.D;
  int64_t c = 0;
  if (direct) {
    for (; c + KC <= nc; c += KC) qk_tile_split<DT, R, KC>(kc + c * D, D, qx, st + c * (16 / R), pf);
    if (c < nc && nc >= KC) {
      c = nc - KC;
      qk_tile_split<DT, R, KC>(kc + c * D, D, qx, st + c * (16 / R), pf);
    } else if (c < nc) {
      std::memset(ktail, 0, sizeof(float) * KC * D);
      std::memcpy(ktail, kc + c * D, sizeof(float) * (nc - c) * D);
      qk_tile_split<DT, R, KC>(ktail, D, qx, st + c * (16 / R), pf);
    }
  } else {
    for (; c < nc; c += KC) qk_tile_split<DT, R, KC>(kc + c * D, D, qx, st + c * (16 / R), pf);
  }
}

template <int DT>
void qk_split_dispatch(int r, const Args& a, const float* kc, int64_t nc, bool direct, const float* qx,
                       float* st, float* ktail, Prefetch& pf) {
  switch (r) {
    case 2: return qk_block_split<DT, 2>(a, kc, nc, direct, qx, st, ktail, pf);
    case 4: return qk_block_split<DT, 4>(a, kc, nc, direct, qx, st, ktail, pf);
    case 8: return qk_block_split<DT, 8>(a, kc, nc, direct, qx, st, ktail, pf);
    default: return qk_block_split<DT, 16>(a, kc, nc, direct, qx, st, ktail, pf);
  }
}
#else
constexpr bool kHasSplitQK = false;
template <int DT>
void qk_split_dispatch(int, const Args&, const float*, int64_t, bool, const float*, float*, float*, Prefetch&) {}
#endif

// Lanes per query row of the row-split QK, 0 where it does not apply.
inline int split_lanes(int64_t M, int64_t D, int flags) {
  if (!kHasSplitQK || (flags & 2) || M > W / 2) return 0;
  int mq = 1;
  while (mq < M) mq *= 2;
  const int r = W / mq;
  return D % r == 0 ? r : 0;
}

inline void widen_rows(const uint16_t* src, int64_t rows, int64_t D, float* dst, int kv) {
  const int64_t n = rows * D;
  int64_t i = 0;
  if (kv == 2) {  // fp16
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#endif
    for (; i < n; ++i) dst[i] = half_to_float(src[i]);
    return;
  }
  for (; i + W <= n; i += W) vstore(dst + i, vload_bf16(src + i));
  for (; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

// Work units (vector FMAs, rounded up to 8 keys) that pv_rows passes to Prefetch::step().
template <int DT>
inline int64_t pv_units(int64_t rows, int64_t nc) {
  if constexpr (DT > 0 && DT % W == 0) {
    return rows * (DT / W) * ((nc + 7) / 8 * 8);
  } else {
    return 0;
  }
}

// Q^T of the M query rows (row m = i*g + j at qr.p + i*qr.tok + j*D), pre-scaled by a.qscale,
// padded rows zero: qt[d][m] (Mp columns), or for the row-split QK (R lanes a row, R > 0)
// qt[t][m*R + j] = q[m][t*R + j].
void pack_qt(const Args& a, const QRows& qr, int64_t D, int R, float* qt) {
  const int64_t g = a.g, M = a.M, Mp = a.Mp;
#if defined(__AVX512F__)
  // One gather per vector of qt, contiguous stores (row by row the scalar stores would be
  // scattered). Offsets are int32: fine for q up to 2^31 floats past this (b, h).
  if (a.N * qr.tok + g * D < (int64_t(1) << 31)) {
    const __m512 sc = _mm512_set1_ps(a.qscale);
    auto row_off = [&](int64_t m) { return m / g * qr.tok + m % g * D; };
    alignas(64) int32_t off[16];
    if (R) {  // lane l = m*R + j of qt[t] holds q[m][t*R + j]
      for (int64_t l = 0; l < 16; ++l) off[l] = int32_t(row_off(std::min<int64_t>(l / R, M - 1)) + l % R);
      const __m512i idx = _mm512_load_si512(off);
      const __mmask16 valid = __mmask16((1u << (M * R)) - 1);  // M*R <= 16 (split_lanes)
      for (int64_t t = 0; t < D / R; ++t)
        _mm512_storeu_ps(qt + t * W, _mm512_mul_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, idx, qr.p + t * R, 4), sc));
    } else {  // lanes of qt[d][m0 .. m0+15] are rows
      for (int64_t m0 = 0; m0 < Mp; m0 += 16) {
        for (int64_t l = 0; l < 16; ++l) off[l] = int32_t(row_off(std::min<int64_t>(m0 + l, M - 1)));
        const __m512i idx = _mm512_load_si512(off);
        const __mmask16 valid = __mmask16(M - m0 >= 16 ? 0xFFFF : (1u << (M - m0)) - 1);
        for (int64_t d = 0; d < D; ++d)
          _mm512_storeu_ps(qt + d * Mp + m0, _mm512_mul_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, idx, qr.p + d, 4), sc));
      }
    }
    return;
  }
#endif
  std::memset(qt, 0, sizeof(float) * D * Mp);
  for (int64_t i = 0; i < a.N; ++i)
    for (int64_t j = 0; j < g; ++j) {
      const int64_t m = i * g + j;
      const float* src = qr.p + i * qr.tok + j * D;
      if (R)
        for (int64_t d = 0; d < D; ++d) qt[d / R * W + m * R + d % R] = src[d] * a.qscale;
      else
        for (int64_t d = 0; d < D; ++d) qt[d * Mp + m] = src[d] * a.qscale;
    }
}

#if defined(__AVX512F__)
// Every lane l gets op over the lanes of its row (l % Mq; Mq a power of two <= 16): folds of the
// vector rotated by Mq, 2Mq, .. lanes, which keep each lane among its row's.
inline __m512i lane_index() { return _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); }
template <class Op>
inline __m512 row_fold(__m512 x, int64_t Mq, Op op) {
  for (int64_t s = Mq; s < 16; s *= 2)
    x = op(x, _mm512_permutexvar_ps(_mm512_and_si512(_mm512_add_epi32(lane_index(), _mm512_set1_epi32(int(s))),
                                                     _mm512_set1_epi32(15)), x));
  return x;
}

// The row-split QK's packed scores st (nc keys x Mq rows; lane l of every vector is row l % Mq),
// padding past nc set to -inf: the new row maxima and alpha; returns each lane's row maximum, the
// one its probabilities are taken against. All in vectors: a libm exp2 per row and chunk costs ~1%
// of a k+1 = 1 call.
inline vf packed_max(float* st, int64_t nc, int64_t Mq, float* mrow, float* alpha) {
  const int64_t n = nc * Mq, nv = (n + W - 1) / W;
  for (int64_t i = n; i < nv * W; ++i) st[i] = NEG_INF;
  __m512 cm = _mm512_set1_ps(NEG_INF);
  for (int64_t v = 0; v < nv; ++v) cm = _mm512_max_ps(cm, _mm512_loadu_ps(st + v * W));
  const __mmask16 rows = __mmask16((1u << Mq) - 1);
  const __m512i row = _mm512_and_si512(lane_index(), _mm512_set1_epi32(int(Mq - 1)));  // lane l: row l % Mq
  const __m512 mold = _mm512_permutexvar_ps(row, _mm512_maskz_loadu_ps(rows, mrow));
  const __m512 mnew = _mm512_max_ps(mold, row_fold(cm, Mq, [](__m512 x, __m512 y) { return _mm512_max_ps(x, y); }));
  const __m512 ms = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mnew, _mm512_set1_ps(NEG_INF), _CMP_EQ_OQ), mnew,
                                         _mm512_setzero_ps());  // a row that saw no key yet: 0
  _mm512_mask_storeu_ps(alpha, rows, (__m512)vexp2((vf)_mm512_sub_ps(mold, ms)));
  _mm512_mask_storeu_ps(mrow, rows, mnew);
  return (vf)ms;
}

// lrow = lrow * alpha + the row sums of per-lane sums (lane l: row l % Mq).
inline void packed_sums(vf sum, int64_t Mq, const float* alpha, float* lrow) {
  const __mmask16 rows = __mmask16((1u << Mq) - 1);
  const __m512 sm = row_fold((__m512)sum, Mq, [](__m512 x, __m512 y) { return _mm512_add_ps(x, y); });
  _mm512_mask_storeu_ps(lrow, rows, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(rows, lrow), _mm512_maskz_loadu_ps(rows, alpha), sm));
}

// Online softmax on packed scores (see packed_max): the probabilities in place and the row sums.
void softmax_packed(float* st, int64_t nc, int64_t Mq, float* mrow, float* lrow, float* alpha) {
  const vf msv = packed_max(st, nc, Mq, mrow, alpha);
  const int64_t nv = (nc * Mq + W - 1) / W;
  vf sum = vf{};
  for (int64_t v = 0; v < nv; ++v) {
    const vf pc = vexp2(vload(st + v * W) - msv);
    vstore(st + v * W, pc);
    sum += pc;
  }
  packed_sums(sum, Mq, alpha, lrow);
}
#else
void softmax_packed(float*, int64_t, int64_t, float*, float*, float*) {}  // never called: no row split
#endif

}  // namespace
