// The AMX path (TDPBF16PS) of CPU verify attention, the calls run_item makes on the bf16 paths,
// and the online softmax of a row block. Included by verify_attention.cpp after
// verify_attention_dpbf.h (layouts described in verify_attention_bf16.h).
#pragma once

namespace {

// ------------------------------------------------------------------ AMX (TDPBF16PS)
#if VA_HAS_AMX
// Every tile 16 rows x 64 bytes. Tiles 0-3: accumulators; 4-5: A operands; 5-7: B operands.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
void amx_begin() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) { cfg.colsb[i] = 64; cfg.rows[i] = 16; }
  _tile_loadconfig(&cfg);
}
void amx_end() { _tile_release(); }

// st[c][t*16 ..] for 16 keys c (K rows k, ldk bytes apart) and NB tiles of 16 query rows.
template <int NB>
inline void amx_qk_keys(const uint16_t* k, int64_t ldk, const uint32_t* qp, int64_t Mp, int64_t Dp,
                        int64_t qpart, int qparts, float* st, int64_t lds, Prefetch& pf) {
  _tile_zero(0);
  if constexpr (NB > 1) _tile_zero(1);
  if constexpr (NB > 2) _tile_zero(2);
  if constexpr (NB > 3) _tile_zero(3);
  const int64_t ldq = Mp * 4;
  for (int64_t d0 = 0; d0 < Dp; d0 += 32) {
    _tile_loadd(4, k + d0, ldk);
    const uint32_t* qb = qp + d0 / 2 * Mp;
    for (int p = 0; p < qparts; ++p, qb += qpart) {
      _tile_loadd(5, qb, ldq);
      _tile_dpbf16ps(0, 4, 5); pf.step(1);
      if constexpr (NB > 1) { _tile_loadd(6, qb + 16, ldq); _tile_dpbf16ps(1, 4, 6); pf.step(1); }
      if constexpr (NB > 2) { _tile_loadd(7, qb + 32, ldq); _tile_dpbf16ps(2, 4, 7); pf.step(1); }
      if constexpr (NB > 3) { _tile_loadd(5, qb + 48, ldq); _tile_dpbf16ps(3, 4, 5); pf.step(1); }
    }
  }
  _tile_stored(0, st, lds * 4);
  if constexpr (NB > 1) _tile_stored(1, st + 16, lds * 4);
  if constexpr (NB > 2) _tile_stored(2, st + 32, lds * 4);
  if constexpr (NB > 3) _tile_stored(3, st + 48, lds * 4);
}

// The blocked tiles below load one operand tile per TDPBF16PS (amx_qk_keys<4> loads five per four)
// and keep four independent accumulators (amx_qk_keys<1> and <2> chain one or two): on this
// machine's AMX each extra tile load costs about a third of a TDPBF16PS.

// st for 32 keys (K tiles at k and 16 rows on) x 32 query rows (Q tiles at qb0 and 16 on).
inline void amx_qk_2x2(const uint16_t* k, int64_t ldk, const uint32_t* qb0, int64_t Mp, int64_t Dp, int64_t qpart,
                       int qparts, float* st, int64_t lds, Prefetch& pf) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t ldq = Mp * 4;
  const uint16_t* k1 = reinterpret_cast<const uint16_t*>(reinterpret_cast<const char*>(k) + 16 * ldk);
  for (int64_t d0 = 0; d0 < Dp; d0 += 32) {
    _tile_loadd(4, k + d0, ldk);
    _tile_loadd(5, k1 + d0, ldk);
    const uint32_t* qb = qb0 + d0 / 2 * Mp;
    for (int p = 0; p < qparts; ++p, qb += qpart) {
      _tile_loadd(6, qb, ldq);
      _tile_loadd(7, qb + 16, ldq);
      _tile_dpbf16ps(0, 4, 6); pf.step(1);
      _tile_dpbf16ps(1, 4, 7); pf.step(1);
      _tile_dpbf16ps(2, 5, 6); pf.step(1);
      _tile_dpbf16ps(3, 5, 7); pf.step(1);
    }
  }
  _tile_stored(0, st, lds * 4);
  _tile_stored(1, st + 16, lds * 4);
  _tile_stored(2, st + 16 * lds, lds * 4);
  _tile_stored(3, st + 16 * lds + 16, lds * 4);
}

// st for 64 keys (four K tiles, 16 rows apart) x one Q tile of 16 rows.
inline void amx_qk_4x1(const uint16_t* k, int64_t ldk, const uint32_t* qp, int64_t Mp, int64_t Dp, int64_t qpart,
                       int qparts, float* st, Prefetch& pf) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t ldq = Mp * 4, step = 16 * ldk;
  const char* kb = reinterpret_cast<const char*>(k);
  for (int64_t d0 = 0; d0 < Dp; d0 += 32) {
    const uint32_t* qb = qp + d0 / 2 * Mp;
    for (int p = 0; p < qparts; ++p, qb += qpart) {
      _tile_loadd(7, qb, ldq);
      _tile_loadd(4, kb + 2 * d0, ldk);
      _tile_dpbf16ps(0, 4, 7); pf.step(1);
      _tile_loadd(5, kb + step + 2 * d0, ldk);
      _tile_dpbf16ps(1, 5, 7); pf.step(1);
      _tile_loadd(6, kb + 2 * step + 2 * d0, ldk);
      _tile_dpbf16ps(2, 6, 7); pf.step(1);
      _tile_loadd(4, kb + 3 * step + 2 * d0, ldk);
      _tile_dpbf16ps(3, 4, 7); pf.step(1);
    }
  }
  _tile_stored(0, st, 64);
  _tile_stored(1, st + 256, 64);
  _tile_stored(2, st + 512, 64);
  _tile_stored(3, st + 768, 64);
}

template <int NB>
void amx_qk_block(const uint16_t* k, int64_t ldk, bool padded, int64_t nc, const uint32_t* qp, int64_t Mp,
                  int64_t Dp, int64_t qpart, int qparts, float* st, Prefetch& pf) {
  const int64_t lds = NB * 16;
  int64_t c = 0;
  if constexpr (NB == 1)
    for (; c + 64 <= nc; c += 64) amx_qk_4x1(k + c * ldk, ldk * 2, qp, Mp, Dp, qpart, qparts, st + c * lds, pf);
  if constexpr (NB % 2 == 0)
    for (; c + 32 <= nc; c += 32)
      for (int j = 0; j < NB; j += 2)
        amx_qk_2x2(k + c * ldk, ldk * 2, qp + 16 * j, Mp, Dp, qpart, qparts, st + c * lds + 16 * j, lds, pf);
  for (; c + 16 <= nc; c += 16) amx_qk_keys<NB>(k + c * ldk, ldk * 2, qp, Mp, Dp, qpart, qparts, st + c * lds, lds, pf);
  if (c < nc) {  // padded rows are zero; else the last 16 keys again (nc >= 16 here)
    if (!padded) c = nc - 16;
    amx_qk_keys<NB>(k + c * ldk, ldk * 2, qp, Mp, Dp, qpart, qparts, st + c * lds, lds, pf);
  }
}

// The softmax's probabilities of the 16 rows of vector v straight into the P pairs PV multiplies:
// p[c][m] = 2^(st[c][m] * sc - ms[m]) for c < nc, zero from nc to 2 * pairs, rounded to bf16 (as flash
// attention does; P is in [0, 1]) as pt[m][t] = (p[2t][m], p[2t+1][m]), rows as rows. Returns the
// fp32 sum over c of each row's p.
inline __m512 amx_exp_pack(const float* st, int64_t Mb, int64_t v, int64_t nc, int64_t pairs, __m512 sc, __m512 ms,
                           uint32_t* pt, Prefetch& pf) {
  __m512 sum = _mm512_setzero_ps();
  auto prob = [&](int64_t c) {
    return c < nc ? exp2_bf16(_mm512_fmsub_ps(_mm512_loadu_ps(st + c * Mb + v * 16), sc, ms))
                  : _mm512_setzero_ps();
  };
  for (int64_t t0 = 0; t0 < pairs; t0 += 16) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) {
      const __m512 x = prob(2 * (t0 + i)), y = prob(2 * (t0 + i) + 1);
      sum = _mm512_add_ps(sum, _mm512_add_ps(x, y));
      r[i] = bf16_pairs(x, y);
    }
    transpose16(r);
    for (int j = 0; j < 16; ++j) _mm512_storeu_si512(pt + (v * 16 + j) * pairs + t0, r[j]);
    pf.step(EXP_PACK_UNITS);
  }
  return sum;
}

// o[16 rows][NT*16 d] += P . V over `pairs` key pairs.
template <int NT>
inline void amx_pv_tiles(const uint32_t* pt, int64_t pairs, const uint32_t* vv, int64_t Dv, float* o, Prefetch& pf) {
  const int64_t ldo = Dv * 4, ldp = pairs * 4, ldv = Dv * 4;
  _tile_loadd(0, o, ldo);
  if constexpr (NT > 1) _tile_loadd(1, o + 16, ldo);
  if constexpr (NT > 2) _tile_loadd(2, o + 32, ldo);
  if constexpr (NT > 3) _tile_loadd(3, o + 48, ldo);
  for (int64_t t0 = 0; t0 < pairs; t0 += 16) {
    _tile_loadd(4, pt + t0, ldp);
    const uint32_t* vb = vv + t0 * Dv;
    _tile_loadd(6, vb, ldv);
    _tile_dpbf16ps(0, 4, 6); pf.step(1);
    if constexpr (NT > 1) { _tile_loadd(7, vb + 16, ldv); _tile_dpbf16ps(1, 4, 7); pf.step(1); }
    if constexpr (NT > 2) { _tile_loadd(5, vb + 32, ldv); _tile_dpbf16ps(2, 4, 5); pf.step(1); }
    if constexpr (NT > 3) { _tile_loadd(6, vb + 48, ldv); _tile_dpbf16ps(3, 4, 6); pf.step(1); }
  }
  _tile_stored(0, o, ldo);
  if constexpr (NT > 1) _tile_stored(1, o + 16, ldo);
  if constexpr (NT > 2) _tile_stored(2, o + 32, ldo);
  if constexpr (NT > 3) _tile_stored(3, o + 48, ldo);
}

// o[32 rows][32 d] += P . V over `pairs` key pairs: P rows at pt and 16 rows on, V pairs at vv and 16 d on.
inline void amx_pv_2x2(const uint32_t* pt, int64_t pairs, const uint32_t* vv, int64_t Dv, float* o, Prefetch& pf) {
  const int64_t ldo = Dv * 4, ldp = pairs * 4, ldv = Dv * 4;
  float* o1 = o + 16 * Dv;
  _tile_loadd(0, o, ldo);
  _tile_loadd(1, o + 16, ldo);
  _tile_loadd(2, o1, ldo);
  _tile_loadd(3, o1 + 16, ldo);
  for (int64_t t0 = 0; t0 < pairs; t0 += 16) {
    _tile_loadd(4, pt + t0, ldp);
    _tile_loadd(5, pt + 16 * pairs + t0, ldp);
    _tile_loadd(6, vv + t0 * Dv, ldv);
    _tile_loadd(7, vv + t0 * Dv + 16, ldv);
    _tile_dpbf16ps(0, 4, 6); pf.step(1);
    _tile_dpbf16ps(1, 4, 7); pf.step(1);
    _tile_dpbf16ps(2, 5, 6); pf.step(1);
    _tile_dpbf16ps(3, 5, 7); pf.step(1);
  }
  _tile_stored(0, o, ldo);
  _tile_stored(1, o + 16, ldo);
  _tile_stored(2, o1, ldo);
  _tile_stored(3, o1 + 16, ldo);
}

// PV of one row block (Mb rows, all of them: padding rows are finite and never read), P pairs pt
// from amx_exp_pack.
void amx_pv(int64_t Mb, int64_t nc, const uint32_t* vv, int64_t Dv, const float* alpha, float* o,
            const uint32_t* pt, Prefetch& pf) {
  const int64_t pairs = round_up(nc, 32) / 2;
  for (int64_t m = 0; m < Mb; ++m) {
    if (alpha[m] == 1.0f) continue;
    const __m512 al = _mm512_set1_ps(alpha[m]);
    for (int64_t d = 0; d < Dv; d += 16) _mm512_storeu_ps(o + m * Dv + d, _mm512_mul_ps(_mm512_loadu_ps(o + m * Dv + d), al));
  }
  int64_t m0 = 0;
  for (; m0 + 32 <= Mb; m0 += 32) {  // pairs of row tiles by pairs of d tiles, one load per TDPBF16PS
    int64_t g0 = 0;
    for (; g0 + 2 <= Dv / 16; g0 += 2) amx_pv_2x2(pt + m0 * pairs, pairs, vv + g0 * 16, Dv, o + m0 * Dv + g0 * 16, pf);
    if (g0 < Dv / 16)
      for (int64_t r = m0; r < m0 + 32; r += 16) amx_pv_tiles<1>(pt + r * pairs, pairs, vv + g0 * 16, Dv, o + r * Dv + g0 * 16, pf);
  }
  for (; m0 < Mb; m0 += 16)
    for (int64_t g0 = 0; g0 < Dv / 16; g0 += 4) {
      const uint32_t* p = pt + m0 * pairs;
      float* ob = o + m0 * Dv + g0 * 16;
      switch (std::min<int64_t>(4, Dv / 16 - g0)) {
        case 4: amx_pv_tiles<4>(p, pairs, vv + g0 * 16, Dv, ob, pf); break;
        case 3: amx_pv_tiles<3>(p, pairs, vv + g0 * 16, Dv, ob, pf); break;
        case 2: amx_pv_tiles<2>(p, pairs, vv + g0 * 16, Dv, ob, pf); break;
        default: amx_pv_tiles<1>(p, pairs, vv + g0 * 16, Dv, ob, pf); break;
      }
    }
}
#else
void amx_begin() {}
void amx_end() {}
#endif  // VA_HAS_AMX

// ------------------------------------------------------------------ the calls run_item makes

struct FastChunk {
  const uint16_t* k;  // K rows, ldk elements apart
  int64_t ldk;
  bool padded;        // k is kf: zero rows past nc, D padded to Dp
  const uint16_t* v;  // V rows of the chunk in the cache (AVX512-BF16's PV reads them there: dpbf_pv_block)
};

// K in place where its rows are whole bf16 tiles, else copied; AMX's V pairs packed (AVX512-BF16 pairs
// V in its first PV tile: dpbf_pv_block).
FastChunk fast_chunk(const Args& a, const FastDims& fd, int64_t head, int64_t c0, int64_t nc, uint16_t* kf, uint32_t* vv,
                     Prefetch& pf) {
  FastChunk ch{static_cast<const uint16_t*>(a.k) + head + c0 * a.D, a.D, false,
               static_cast<const uint16_t*>(a.v) + head + c0 * a.D};
#if VA_HAS_DPBF
  const int64_t tile = a.path == PATH_AMX ? 16 : NACC;
  if (a.kv == 2 || a.D % 32 != 0 || nc < tile) {
    copy_k(ch.k, nc, a.D, a.kv, fd.Dp, kf);
    ch = FastChunk{kf, fd.Dp, true, ch.v};
  }
  if (a.path == PATH_AMX) pack_v(ch.v, nc, a.D, a.kv, fd.Dv, vv, pf);
#endif
  return ch;
}

// Work units of a chunk that the fast paths pass to Prefetch::step (see there), for row block 0 of
// Mb rows: AMX one per TDPBF16PS of QK and PV, EXP_PACK_UNITS per 16 key pairs of each 16 rows' P
// packing and one per V pair packed; AVX512-BF16 its vector dot products (R > 0: the row-split QK's).
int64_t fast_units(const Args& a, const FastDims& fd, int64_t Mb, int64_t rows, int64_t nc, int qparts, int R) {
  const int64_t nb = Mb / 16, pairs = round_up(nc, 32) / 2;
  if (a.path == PATH_AMX) {
    const int64_t qk = (nc + 15) / 16 * (fd.Dp / 32) * nb * qparts, pv = nb * (fd.Dv / 16) * (pairs / 16);
    return qk + pv + nb * (pairs / 16) * EXP_PACK_UNITS + pairs;
  }
  const int64_t pv = (nc + 15) / 16 * 8 * rows * (fd.Dv / 16);
  // The row-split tiles (dpbf_qk_split_block): at R = 2 a tile of NACC keys steps KC*8 units every 8
  // of its T/2 steps; at R >= 4 a tile of R keys steps 16 units every 16 of its T pairs.
  const int64_t T = fd.Dp / 2;
  if (R == 2) return (nc + NACC - 1) / NACC * NACC * ((T / 2 + 7) / 8 * 8) * qparts + pv;
  if (R) return (nc + R - 1) / R * T * qparts + pv;
  const int64_t kc = NACC / nb;
  return (nc + kc - 1) / kc * ((fd.Dp / 2 + 7) / 8) * kc * nb * 8 * qparts + pv;
}

void fast_qk(const Args& a, const FastDims& fd, const FastChunk& ch, int64_t nc, const uint32_t* qp, int qparts,
             int mv, float* st, Prefetch& pf, FusedP* f = nullptr) {
#if VA_HAS_DPBF
  const int64_t Dp = ch.padded ? fd.Dp : a.D;
  if (a.path == PATH_AMX) {
#if VA_HAS_AMX
    const int64_t qpart = (fd.Dp / 2) * a.Mp;
    switch (mv) {
      case 1: return amx_qk_block<1>(ch.k, ch.ldk, ch.padded, nc, qp, a.Mp, Dp, qpart, qparts, st, pf);
      case 2: return amx_qk_block<2>(ch.k, ch.ldk, ch.padded, nc, qp, a.Mp, Dp, qpart, qparts, st, pf);
      case 3: return amx_qk_block<3>(ch.k, ch.ldk, ch.padded, nc, qp, a.Mp, Dp, qpart, qparts, st, pf);
      default: return amx_qk_block<4>(ch.k, ch.ldk, ch.padded, nc, qp, a.Mp, Dp, qpart, qparts, st, pf);
    }
#endif
  }
  switch (mv) {
    case 1: return dpbf_qk_block<1>(ch.k, ch.ldk, ch.padded, nc, qp, a.Mp, Dp / 2, qparts, st, pf, f);
    case 2: return dpbf_qk_block<2>(ch.k, ch.ldk, ch.padded, nc, qp, a.Mp, Dp / 2, qparts, st, pf, f);
    case 3: return dpbf_qk_block<3>(ch.k, ch.ldk, ch.padded, nc, qp, a.Mp, Dp / 2, qparts, st, pf, f);
    default: return dpbf_qk_block<4>(ch.k, ch.ldk, ch.padded, nc, qp, a.Mp, Dp / 2, qparts, st, pf, f);
  }
#endif
}

// AVX512-BF16 QK and softmax in one (FusedP) for a row block of Mb = mv*16 rows against a chunk of nc
// keys that all of them see, once the rows have a maximum (after the item's first chunk): true when
// done (P pairs in pt, lrow += the chunk's sums, alpha = 1, mrow kept). False, and only pt written,
// where the path, the scale or the chunk's length (a multiple of the tile's keys) rule it out or a
// row's sum rose past FusedP::MAX_SUM; the caller then runs QK and the softmax.
bool fast_qk_fused(const Args& a, const FastDims& fd, const FastChunk& ch, int64_t nc, const uint32_t* qp,
                   int qparts, int mv, const float* mrow, float* lrow, float* alpha, uint32_t* pt, Prefetch& pf) {
#if VA_HAS_DPBF
  const int64_t Mb = 16 * mv;
  if (a.path != PATH_DPBF || !(a.qscale > 0.0f) || nc % (NACC / mv) != 0) return false;
  for (int64_t m = 0; m < Mb; ++m)
    if (!std::isfinite(mrow[m])) return false;
  alignas(64) float sum[4 * 16] = {};
  FusedP f{_mm512_set1_ps(a.qscale), mrow, sum, pt};
  fast_qk(a, fd, ch, nc, qp, qparts, mv, nullptr, pf, &f);
  for (int64_t m = 0; m < Mb; ++m)
    if (!(sum[m] <= FusedP::MAX_SUM)) return false;  // inf and NaN too
  for (int64_t m = 0; m < Mb; ++m) {
    lrow[m] += sum[m];
    alpha[m] = 1.0f;
  }
  return true;
#else
  return false;
#endif
}

void fast_pv(const Args& a, const FastDims& fd, const float* st, int64_t Mb, int64_t rows, int64_t nc,
             const FastChunk& ch, uint32_t* vv, bool vv_ready, const float* alpha, float* o, uint32_t* pbuf,
             Prefetch& pf) {
#if VA_HAS_AMX
  if (a.path == PATH_AMX) return amx_pv(Mb, nc, vv, fd.Dv, alpha, o, pbuf, pf);
#endif
#if VA_HAS_DPBF
  dpbf_pv_block(Mb, rows, nc, ch.v, a.D, a.kv, fd.Dv, alpha, o, pbuf, vv, vv_ready, pf);
#endif
}

// Online softmax update of one row block (st [nc][Mb], mv vectors of W rows; mrow, lrow, alpha at the
// block's first row), vectorised over query rows. The scores are scaled by sc here (the fast paths'
// unscaled scores; 1 otherwise): sc > 0, so the scaled maximum is sc * the maximum. The bf16 paths
// write the probabilities straight into their P pairs pt, the fp32 path back into st.
void softmax_rows(const Args& a, bool fast, float* st, int64_t Mb, int mv, int64_t nc, float* mrow, float* lrow,
                  float* alpha, uint32_t* pt, Prefetch& pf) {
  const vf sc = vsplat(fast && a.qscale > 0.0f ? a.qscale : 1.0f);
  for (int v = 0; v < mv; ++v) {
    vf cm = vsplat(NEG_INF);
    for (int64_t c = 0; c < nc; ++c) cm = vmax(cm, vload(st + c * Mb + v * W));
    const vf mold = vload(mrow + v * W);
    const vf mnew = vmax(mold, cm * sc);
    const vf ms = mnew == vsplat(NEG_INF) ? vsplat(0.0f) : mnew;
    const vf al = vexp2(mold - ms);
    vf sum = vf{};
#if VA_HAS_AMX
    if (a.path == PATH_AMX) {
      sum = (vf)amx_exp_pack(st, Mb, v, nc, round_up(nc, 32) / 2, (__m512)sc, (__m512)ms, pt, pf);
    } else
#endif
#if VA_HAS_DPBF
    if (fast) {  // AVX512-BF16: P rounded to bf16 for PV (so 2^x to bf16's precision), written as its pairs
      sum = (vf)dpbf_exp_pack(st, Mb, v, nc, (__m512)sc, (__m512)ms, pt);
    } else
#endif
    {
      for (int64_t c = 0; c < nc; ++c) {
        const vf pc = vexp2(vload(st + c * Mb + v * W) * sc - ms);
        vstore(st + c * Mb + v * W, pc);
        sum += pc;
      }
    }
    vstore(lrow + v * W, vload(lrow + v * W) * al + sum);
    vstore(mrow + v * W, mnew);
    vstore(alpha + v * W, al);
  }
}

}  // namespace
