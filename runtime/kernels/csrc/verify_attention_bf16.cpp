// Tile-speed paths of CPU verify attention for bf16 and fp16 KV: AMX tiles (TDPBF16PS) and
// AVX512-BF16 dot products (VDPBF16PS). Part of verify_attention.cpp, which includes this file
// after its helpers (W, NACC, Prefetch, Args, Buf); runtime.kernels.build hashes both.
//
// The path is chosen per call (Args::path): PATH_FP32 is the widening fp32 path of
// verify_attention.cpp; PATH_DPBF and PATH_AMX replace its QK and PV only. The online softmax,
// GQA grouping, chunking, causal block and split-K merge are the same code for every path.
// available_paths() tells which this machine offers: compiled in (-march=native), the CPU's
// cpuid flags, and for AMX the OS's XTILEDATA permission (arch_prctl ARCH_REQ_XCOMP_PERM).
//
// Layouts (dwords hold two bf16, the lower index in the low half: the VNNI pairs both
// instructions multiply):
//   qp [parts][Dp/2][Mp]  Q^T pairs, qp[p][t][m] = part p of (q[m][2t], q[m][2t+1]), unscaled
//   kf [keys][Dp]         K rows copied (fp16 converted, D padded to Dp = D rounded up to 32)
//                         when K cannot be read in place (D % 32 != 0, fp16, short chunk)
//   vv [pairs][Dv]        V pairs, vv[t][d] = (v[2t][d], v[2t+1][d]), Dv = D rounded up to 16
//   pt [Mb][pairs]        P pairs transposed (AMX A operand): pt[m][t] = (P[m][2t], P[m][2t+1])
//   of [Mp][Dv]           the output accumulator of the fast paths
//
// QK computes S^T[c][m] (keys as rows) straight into the softmax's st layout: AMX with K rows as
// the A tile (read in place from the cache) and Q^T pairs as the B tile; AVX512-BF16 with a K
// pair broadcast against a vector of 16 query rows' Q pairs. PV computes O[m][d] += P[m][c]
// V[c][d] with V pairs as the B operand (AMX: P^T transposed to P rows as the A tile;
// AVX512-BF16: a P pair broadcast against 16 d of V pairs).
//
// Precision. K and V are bf16 already (fp16 rounded to bf16); the products are exact in fp32
// and accumulated in fp32. Q is packed unscaled and the scores scaled in fp32 afterwards, so a q
// of bf16 values (what a bf16 model computes) is exact in one part. AVX512-BF16 rounds any other
// q to bf16; AMX splits it into up to three bf16 parts (exact to 2^-24), only where needed. Both
// round P (in [0, 1]) to bf16 for PV, as flash attention does: relative 2^-9 per probability,
// about 1e-3 off the fp32 path at the output (bf16 tolerance). So their 2^x is a degree-3
// polynomial (exp2_bf16, 7.5e-5 relative) where the fp32 path's has degree 6 (2e-7).

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define VA_HAS_DPBF 1
#else
#define VA_HAS_DPBF 0
#endif
#if VA_HAS_DPBF && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define VA_HAS_AMX 1
#else
#define VA_HAS_AMX 0
#endif

namespace {

enum { PATH_AUTO = 0, PATH_FP32 = 1, PATH_DPBF = 2, PATH_AMX = 3 };
constexpr int QPARTS_AMX = 3;  // most bf16 parts Q is split into (fp32 q: exact to 2^-24)
constexpr int64_t FAST_CHUNK = 192;  // default keys per chunk (measured best of 64..384 here)

// Bit p set: path p runs here.
unsigned available_paths() {
  static const unsigned paths = [] {
    unsigned m = 1u << PATH_FP32;
    unsigned a, b, c, d;
    if (VA_HAS_DPBF && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5)))  // AVX512_BF16
      m |= 1u << PATH_DPBF;
    if (VA_HAS_AMX && (m & (1u << PATH_DPBF)) && __get_cpuid_count(7, 0, &a, &b, &c, &d) &&
        (d & (1u << 22)) && (d & (1u << 24))) {  // AMX-BF16, AMX-TILE
      unsigned lo, hi;
      __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
      const bool os_tiles = (lo & (3u << 17)) == (3u << 17);  // XTILECFG, XTILEDATA enabled
      // Linux hands out the 8 KiB tile state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA).
      if (os_tiles && syscall(SYS_arch_prctl, 0x1023, 18) == 0) m |= 1u << PATH_AMX;
    }
    return m;
  }();
  return paths;
}

inline int best_path() {
  const unsigned m = available_paths();
  return (m >> PATH_AMX) & 1 ? PATH_AMX : (m >> PATH_DPBF) & 1 ? PATH_DPBF : PATH_FP32;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int max_q_parts(int path) { return path == PATH_AMX ? QPARTS_AMX : 1; }

// Buffer sizes (floats) of the fast paths for chunks of up to cmax keys.
struct FastDims {
  int64_t Dp, Dv, kf, vv, pt, of, qp;
  FastDims(const Args& a, int64_t cmax) {
    Dp = round_up(a.D, 32);
    Dv = round_up(a.D, 16);
    const int64_t keys = round_up(cmax, 48), pairs = round_up(cmax, 32) / 2;
    kf = keys * Dp / 2;
    vv = pairs * Dv;
    pt = int64_t(4) * W * pairs;
    of = a.Mp * Dv;
    qp = int64_t(QPARTS_AMX) * (Dp / 2) * a.Mp;
  }
};

// Prefetch units (Prefetch::step) of the AMX path's P packing: 16 key pairs of 16 rows (32 exp2, the
// bf16 pairs and a transpose) take about the time of four TDPBF16PS (measured: 1.01-1.04x over one).
constexpr int EXP_PACK_UNITS = 4;
// Prefetch units of packing one V pair (see fast_units).
inline int pack_unit(const Args& a, const FastDims& fd) { return a.path == PATH_AMX ? 1 : int(fd.Dv / 16); }

inline uint16_t float_to_bf16(float f) {  // round to nearest even (finite f)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

#if VA_HAS_DPBF
// 16x16 dword transpose of r.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit blocks: rows i, i+4, i+8, i+12
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}


// Part p of 16 rows x 32 elements of q (rows m0.., elements 2*t0..) into lo/hi: q minus parts 0..p-1,
// the bf16 pairs of part p in r; returns the bits left over after part p (zero: the sum is exact).
inline __m512i q_part(const Args& a, const QRows& q, int64_t m0, int64_t t0, int p, __m512i r[16]) {
  const int64_t n = a.D - 2 * t0;
  const __mmask16 mlo = __mmask16(n >= 16 ? 0xFFFF : n <= 0 ? 0 : (1u << n) - 1);
  const __mmask16 mhi = __mmask16(n >= 32 ? 0xFFFF : n <= 16 ? 0 : (1u << (n - 16)) - 1);
  __m512i left = _mm512_setzero_si512();
  for (int i = 0; i < 16; ++i) {
    const int64_t m = m0 + i;
    const float* src = q.p + (m / a.g) * q.tok + (m % a.g) * a.D + 2 * t0;
    __m512 lo = m < a.M ? _mm512_maskz_loadu_ps(mlo, src) : _mm512_setzero_ps();
    __m512 hi = m < a.M ? _mm512_maskz_loadu_ps(mhi, src + 16) : _mm512_setzero_ps();
    for (int j = 0; j <= p; ++j) {
      r[i] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // 32 bf16 in order: dword t = pair t
      lo = _mm512_sub_ps(lo, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(r[i])), 16)));
      hi = _mm512_sub_ps(hi, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(r[i], 1)), 16)));
    }
    left = _mm512_or_si512(left, _mm512_or_si512(_mm512_castps_si512(lo), _mm512_castps_si512(hi)));
  }
  return left;
}

// Q^T pairs of the M rows of (b, h), unscaled (the scores are scaled in fp32 after QK), as the
// fewest bf16 parts, at most max_parts, whose sum is q: one when q holds bf16 values (the engine's
// bf16 models), so QK is exact. Part p is written only when parts 0..p-1 leave something over;
// returns the number of parts written, the number QK multiplies.
int pack_q(const Args& a, const QRows& q, int max_parts, int64_t Dp, uint32_t* qp) {
  const int64_t Mp = a.Mp, T = Dp / 2;
  for (int p = 0; p < max_parts; ++p) {
    __m512i left = _mm512_setzero_si512();  // bits part p leaves over, over every row and pair
    for (int64_t m0 = 0; m0 < Mp; m0 += 16)
      for (int64_t t0 = 0; t0 < T; t0 += 16) {
        __m512i r[16];
        left = _mm512_or_si512(left, q_part(a, q, m0, t0, p, r));
        transpose16(r);  // r[j] = pair t0+j of rows m0 .. m0+15
        for (int j = 0; j < 16; ++j) _mm512_storeu_si512(qp + (p * T + t0 + j) * Mp + m0, r[j]);
      }
    if (!_mm512_test_epi32_mask(left, left)) return p + 1;
  }
  return max_parts;
}
#else
int pack_q(const Args&, const QRows&, int, int64_t, uint32_t*) { return 1; }  // no bf16 path compiled
#endif

#if VA_HAS_DPBF
// 32 KV elements from p as bf16 (fp16 converted when kv == 2), zero past the first n.
inline __m512i load_kv32(const uint16_t* p, int kv, int64_t n) {
  const __mmask32 m = n >= 32 ? ~__mmask32(0) : n <= 0 ? 0 : (__mmask32(1) << n) - 1;
  if (kv == 2) {
    const __m512 lo = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16(m), p));
    const __m512 hi = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16(m >> 16), p + 16));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  }
  return _mm512_maskz_loadu_epi16(m, p);
}

// kf[c][0..Dp) = K row c as bf16 (zero past D), rows nc .. round_up(nc, 48) zero.
void copy_k(const uint16_t* src, int64_t nc, int64_t D, int kv, int64_t Dp, uint16_t* kf) {
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t d0 = 0; d0 < Dp; d0 += 32)
      _mm512_storeu_si512(kf + c * Dp + d0, load_kv32(src + c * D + d0, kv, D - d0));
  std::memset(kf + nc * Dp, 0, sizeof(uint16_t) * (round_up(nc, 48) - nc) * Dp);
}

// vv[t][d] = (v[2t][d], v[2t+1][d]) for t < round_up(nc, 32) / 2, zero past nc keys and D.
void pack_v(const uint16_t* src, int64_t nc, int64_t D, int kv, int64_t Dv, uint32_t* vv, int unit, Prefetch& pf) {
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  const int64_t pairs = round_up(nc, 32) / 2;
  for (int64_t t = 0; t < pairs; ++t) {
    const int64_t c = 2 * t;
    for (int64_t d0 = 0; d0 < Dv; d0 += 32) {
      const __m512i x = c < nc ? load_kv32(src + c * D + d0, kv, D - d0) : _mm512_setzero_si512();
      const __m512i y = c + 1 < nc ? load_kv32(src + (c + 1) * D + d0, kv, D - d0) : _mm512_setzero_si512();
      _mm512_storeu_si512(vv + t * Dv + d0, _mm512_permutex2var_epi16(x, lo, y));
      if (d0 + 16 < Dv) _mm512_storeu_si512(vv + t * Dv + d0 + 16, _mm512_permutex2var_epi16(x, hi, y));
    }
    pf.step(unit);
  }
}

// (x[m], y[m]) rounded to bf16 pairs (P is carried in one part: no residual is kept).
inline __m512i bf16_pairs(__m512 x, __m512 y) {
  alignas(64) static const uint16_t idx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                               8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(y, x);  // x's 16 bf16, then y's
  return _mm512_permutexvar_epi16(_mm512_load_si512(idx), h);
}

// 2^x for x <= 0 to the precision a bf16 P keeps: a degree-3 polynomial on [-0.5, 0.5] (relative
// error 7.5e-5, against bf16's rounding of 2^-9 = 2e-3); exactly 0 for x < -126 and -inf.
inline __m512 exp2_bf16(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
  const __m512 r = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(5.517166480e-02f), f, _mm512_set1_ps(2.426111251e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.932609677e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.999280572e-01f));
  return _mm512_maskz_scalef_ps(keep, p, r);
}

inline __m512 st_row(const float* st, int64_t ld, int64_t c, int64_t nc, int64_t m0) {
  return c < nc ? _mm512_loadu_ps(st + c * ld + m0) : _mm512_setzero_ps();
}

// ------------------------------------------------------------------ AVX512-BF16 (VDPBF16PS)

// st[c][v*16 + lane] = sum_t k[c][2t..2t+1] . qp[t][v*16 + lane], c < KC.
template <int MV, int KC>
inline void dpbf_qk_tile(const uint16_t* __restrict k, int64_t ldk, const uint32_t* __restrict qp, int64_t Mp,
                         int64_t T, float* __restrict st, int64_t lds, Prefetch& pf) {
  __m512 acc[KC][MV];
#pragma GCC unroll 32
  for (int c = 0; c < KC; ++c)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) acc[c][v] = _mm512_setzero_ps();
  for (int64_t t = 0; t < T; ++t) {
    if ((t & 7) == 0) pf.step(KC * MV * 8);
    __m512bh qv[MV];
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) qv[v] = (__m512bh)_mm512_loadu_si512(qp + t * Mp + v * 16);
#pragma GCC unroll 32
    for (int c = 0; c < KC; ++c) {
      uint32_t kk;
      std::memcpy(&kk, k + c * ldk + 2 * t, 4);
      const __m512bh kb = (__m512bh)_mm512_set1_epi32(int(kk));
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) acc[c][v] = _mm512_dpbf16_ps(acc[c][v], kb, qv[v]);
    }
  }
#pragma GCC unroll 32
  for (int c = 0; c < KC; ++c)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(st + c * lds + v * 16, acc[c][v]);
}

template <int MV>
void dpbf_qk_block(const uint16_t* k, int64_t ldk, bool padded, int64_t nc, const uint32_t* qp, int64_t Mp,
                   int64_t T, float* st, Prefetch& pf) {
  constexpr int KC = NACC / MV;
  const int64_t lds = MV * 16;
  int64_t c = 0;
  for (; c + KC <= nc; c += KC) dpbf_qk_tile<MV, KC>(k + c * ldk, ldk, qp, Mp, T, st + c * lds, lds, pf);
  if (c < nc) {  // padded rows are zero; else a last tile ending at nc (nc >= KC here)
    if (!padded) c = nc - KC;
    dpbf_qk_tile<MV, KC>(k + c * ldk, ldk, qp, Mp, T, st + c * lds, lds, pf);
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
#endif  // VA_HAS_DPBF

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
};

// K in place where its rows are whole bf16 tiles, else copied; V pairs packed.
FastChunk fast_chunk(const Args& a, const FastDims& fd, int64_t head, int64_t c0, int64_t nc, uint16_t* kf,
                     uint32_t* vv, Prefetch& pf) {
  FastChunk ch{static_cast<const uint16_t*>(a.k) + head + c0 * a.D, a.D, false};
#if VA_HAS_DPBF
  const int64_t tile = a.path == PATH_AMX ? 16 : NACC;
  if (a.kv == 2 || a.D % 32 != 0 || nc < tile) {
    copy_k(ch.k, nc, a.D, a.kv, fd.Dp, kf);
    ch = FastChunk{kf, fd.Dp, true};
  }
  pack_v(static_cast<const uint16_t*>(a.v) + head + c0 * a.D, nc, a.D, a.kv, fd.Dv, vv, pack_unit(a, fd), pf);
#endif
  return ch;
}

// Work units of a chunk that the fast paths pass to Prefetch::step (see there), for row block 0 of
// Mb rows: AMX one per TDPBF16PS of QK and PV, EXP_PACK_UNITS per 16 key pairs of each 16 rows' P
// packing and one per V pair packed; AVX512-BF16 its vector FMAs and Dv / 16 per V pair packed.
int64_t fast_units(const Args& a, const FastDims& fd, int64_t Mb, int64_t rows, int64_t nc, int qparts) {
  const int64_t nb = Mb / 16, pairs = round_up(nc, 32) / 2, packing = pairs * pack_unit(a, fd);
  if (a.path == PATH_AMX) {
    const int64_t qk = (nc + 15) / 16 * (fd.Dp / 32) * nb * qparts, pv = nb * (fd.Dv / 16) * (pairs / 16);
    return qk + pv + nb * (pairs / 16) * EXP_PACK_UNITS + packing;
  }
  const int64_t kc = NACC / nb;
  return (nc + kc - 1) / kc * ((fd.Dp / 2 + 7) / 8) * kc * nb * 8 + (nc + 15) / 16 * 8 * rows * (fd.Dv / 16) + packing;
}

void fast_qk(const Args& a, const FastDims& fd, const FastChunk& ch, int64_t nc, const uint32_t* qp, int qparts,
             int mv, float* st, Prefetch& pf) {
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
    case 1: return dpbf_qk_block<1>(ch.k, ch.ldk, ch.padded, nc, qp, a.Mp, Dp / 2, st, pf);
    case 2: return dpbf_qk_block<2>(ch.k, ch.ldk, ch.padded, nc, qp, a.Mp, Dp / 2, st, pf);
    case 3: return dpbf_qk_block<3>(ch.k, ch.ldk, ch.padded, nc, qp, a.Mp, Dp / 2, st, pf);
    default: return dpbf_qk_block<4>(ch.k, ch.ldk, ch.padded, nc, qp, a.Mp, Dp / 2, st, pf);
  }
#endif
}

void fast_pv(const Args& a, const FastDims& fd, const float* st, int64_t Mb, int64_t rows, int64_t nc,
             const uint32_t* vv, const float* alpha, float* o, uint32_t* pbuf, Prefetch& pf) {
#if VA_HAS_AMX
  if (a.path == PATH_AMX) return amx_pv(Mb, nc, vv, fd.Dv, alpha, o, pbuf, pf);
#endif
#if VA_HAS_DPBF
  dpbf_pv(st, Mb, rows, nc, vv, fd.Dv, alpha, o, pbuf, pf);
#endif
}

}  // namespace
