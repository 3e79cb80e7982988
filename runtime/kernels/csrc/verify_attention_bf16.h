// Tile-speed paths of CPU verify attention for bf16 and fp16 KV: AMX tiles (TDPBF16PS, in
// verify_attention_amx.h) and AVX512-BF16 dot products (VDPBF16PS, in verify_attention_dpbf.h);
// here the path choice and the packing both share. verify_attention.cpp
// includes this file after verify_attention_common.h (W, NACC, Prefetch, Args, Buf);
// runtime.kernels.build hashes every file a kernel includes.
//
// The path is chosen per call (Args::path): PATH_FP32 is the widening fp32 path of
// verify_attention_fp32.h; PATH_DPBF and PATH_AMX replace its QK and PV only. The online softmax,
// GQA grouping, chunking, causal block and split-K merge are the same code for every path.
// available_paths() tells which this machine offers: compiled in (-march=native), the CPU's
// cpuid flags, and for AMX the OS's XTILEDATA permission (arch_prctl ARCH_REQ_XCOMP_PERM).
//
// Layouts (dwords hold two bf16, the lower index in the low half: the VNNI pairs both
// instructions multiply):
//   qp [parts][Dp/2][Mp]  Q^T pairs, qp[p][t][m] = part p of (q[m][2t], q[m][2t+1]), unscaled
//   kf [keys][Dp]         K rows copied (fp16 converted, D padded to Dp = D rounded up to 32)
//                         when K cannot be read in place (D % 32 != 0, fp16, short chunk)
//   vv [pairs][Dv]        V pairs, vv[t][d] = (v[2t][d], v[2t+1][d]), Dv = D rounded up to 16 (AMX);
//                         AVX512-BF16: Dv = D rounded up to 32, each 32 d in the order of two
//                         unpacks (v_pairs in verify_attention_dpbf.h), which its accumulators keep
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
// of bf16 values (what a bf16 model computes) is exact in one part; any other q is split into up
// to three bf16 parts (exact to 2^-24), only where needed, each multiplied by K. Both paths
// round P (in [0, 1]) to bf16 for PV, as flash attention does: relative 2^-9 per probability,
// about 1e-3 off the fp32 path at the output (bf16 tolerance). So their 2^x is a degree-3
// polynomial (exp2_bf16, 7.5e-5 relative) where the fp32 path's has degree 6 (2e-7).

#pragma once

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    defined(__AVX512BF16__)
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
constexpr int QPARTS = 3;  // most bf16 parts Q is split into (fp32 q: exact to 2^-24)
// Default keys per chunk. AMX: 192, the best of 64..384 on a Sapphire Rapids VM. AVX512-BF16 on a Zen 4
// VM: 48 (two row-split tiles) for M <= 8 rows, 1.1-1.3x over 192 at k+1 = 1-2 from DRAM; 96 above,
// 1.0-1.1x. A short chunk keeps what the PV and the prefetch ahead hold in L1 and L2 small. M = 3-4
// (four lanes a row): 32 keys, 1.04-1.20x over 48 from DRAM at ctx 512-8192 (M = 1-2: 0.98-1.03x,
// M = 5-8: 0.86-0.99x); with the KV in L3 (a call repeated on the same 8 MB) 0.89x at ctx 512.
inline int64_t fast_chunk_keys(int path, int64_t M) {
  return path == PATH_AMX ? 192 : M >= 3 && M <= 4 ? 32 : M <= W / 2 ? 48 : 96;
}

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
inline int max_q_parts(int path) { return path == PATH_FP32 ? 1 : QPARTS; }

// Buffer sizes (floats) of the fast paths for chunks of up to cmax keys.
struct FastDims {
  int64_t Dp, Dv, kf, vv, pt, of, qp, qx;
  FastDims(const Args& a, int64_t cmax) {
    Dp = round_up(a.D, 32);
    Dv = round_up(a.D, a.path == PATH_AMX ? 16 : 32);
    const int64_t keys = round_up(cmax, 48), pairs = round_up(cmax, 32) / 2;
    kf = keys * Dp / 2;
    vv = pairs * Dv;
    pt = int64_t(4) * W * pairs;
    of = a.Mp * Dv;
    qp = int64_t(QPARTS) * (Dp / 2) * a.Mp;
    qx = int64_t(QPARTS) * (Dp / 2) * W;  // at most: the row-split Q has Dp/2 * Mq pairs a part
  }
};

// Prefetch units (Prefetch::step) of the AMX path's P packing: 16 key pairs of 16 rows (32 exp2, the
// bf16 pairs and a transpose) take about the time of four TDPBF16PS (measured: 1.01-1.04x over one).
constexpr int EXP_PACK_UNITS = 4;

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


// Part p of 16 rows x 32 elements of q (row i at rows[i] + 2*t0, null: a padding row of zeros): q minus
// parts 0..p-1, the bf16 pairs of part p in r; returns the bits left over after part p (zero: the
// sum is exact).
inline __m512i q_part(const float* const rows[16], int64_t D, int64_t t0, int p, __m512i r[16]) {
  const int64_t n = D - 2 * t0;
  const __mmask16 mlo = __mmask16(n >= 16 ? 0xFFFF : n <= 0 ? 0 : (1u << n) - 1);
  const __mmask16 mhi = __mmask16(n >= 32 ? 0xFFFF : n <= 16 ? 0 : (1u << (n - 16)) - 1);
  __m512i left = _mm512_setzero_si512();
  for (int i = 0; i < 16; ++i) {
    __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
    if (rows[i]) {
      lo = _mm512_maskz_loadu_ps(mlo, rows[i] + 2 * t0);
      hi = _mm512_maskz_loadu_ps(mhi, rows[i] + 2 * t0 + 16);
    }
    for (int j = 0;; ++j) {
      r[i] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // 32 bf16 in order: dword t = pair t
      lo = _mm512_sub_ps(lo, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(r[i])), 16)));
      hi = _mm512_sub_ps(hi, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(r[i], 1)), 16)));
      if (j == p) break;
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
    for (int64_t m0 = 0; m0 < Mp; m0 += 16) {
      const float* rows[16];  // row m = i*g + j of (b, h) at q.p + i*q.tok + j*D
      for (int64_t i = 0, m = m0; i < 16; ++i, ++m) rows[i] = m < a.M ? q.p + (m / a.g) * q.tok + (m % a.g) * a.D : nullptr;
      for (int64_t t0 = 0; t0 < T; t0 += 16) {
        __m512i r[16];
        left = _mm512_or_si512(left, q_part(rows, a.D, t0, p, r));
        transpose16(r);  // r[j] = pair t0+j of rows m0 .. m0+15
        for (int j = 0; j < 16; ++j) _mm512_storeu_si512(qp + (p * T + t0 + j) * Mp + m0, r[j]);
      }
    }
    if (!_mm512_test_epi32_mask(left, left)) return p + 1;
  }
  return max_parts;
}
#else
int pack_q(const Args&, const QRows&, int, int64_t, uint32_t*) { return 1; }  // no bf16 path compiled
#endif

#if VA_HAS_DPBF
// 32 KV elements from p as bf16 (F16: fp16 converted), zero where m is clear.
template <bool F16>
inline __m512i load32(const uint16_t* p, __mmask32 m) {
  if (!F16) return _mm512_maskz_loadu_epi16(m, p);
  const __m512 lo = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16(m), p));
  const __m512 hi = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16(m >> 16), p + 16));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

inline __mmask32 first32(int64_t n) { return n >= 32 ? ~__mmask32(0) : n <= 0 ? 0 : (__mmask32(1) << n) - 1; }

// 32 KV elements from p as bf16 (fp16 converted when kv == 2), zero past the first n.
inline __m512i load_kv32(const uint16_t* p, int kv, int64_t n) {
  return kv == 2 ? load32<true>(p, first32(n)) : load32<false>(p, first32(n));
}

// kf[c][0..Dp) = K row c as bf16 (zero past D), rows nc .. round_up(nc, 48) zero.
void copy_k(const uint16_t* src, int64_t nc, int64_t D, int kv, int64_t Dp, uint16_t* kf) {
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t d0 = 0; d0 < Dp; d0 += 32)
      _mm512_storeu_si512(kf + c * Dp + d0, load_kv32(src + c * D + d0, kv, D - d0));
  std::memset(kf + nc * Dp, 0, sizeof(uint16_t) * (round_up(nc, 48) - nc) * Dp);
}

// vv[t][d] = (v[2t][d], v[2t+1][d]) for t < round_up(nc, 32) / 2, zero past nc keys and D (AMX's B
// tiles); one prefetch unit a pair (fast_units).
void pack_v(const uint16_t* src, int64_t nc, int64_t D, int kv, int64_t Dv, uint32_t* vv, Prefetch& pf) {
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
    pf.step(1);
  }
}

// (x[m], y[m]) rounded to bf16 pairs (P is carried in one part: no residual is kept).
inline __m512i bf16_pairs(__m512 x, __m512 y) {
  alignas(64) static const uint16_t idx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                               8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(y, x);  // x's 16 bf16, then y's
  return _mm512_permutexvar_epi16(_mm512_load_si512(idx), h);
}

// 2^x to the precision a bf16 P keeps: 2^floor(x) times a degree-3 polynomial in x - floor(x)
// (relative error 7.5e-5, against bf16's rounding of 2^-9 = 2e-3); exactly 0 for x < -126 and -inf
// unless FINITE (x finite: below -126 the result is a denormal or 0, which VDPBF16PS reads as 0).
template <bool FINITE = false>
inline __m512 exp2_bf16(__m512 x) {
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // x - floor(x)
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(7.802451662e-02f), f, _mm512_set1_ps(2.260671686e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.958335068e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.999252098e-01f));
  if (FINITE) return _mm512_scalef_ps(p, x);  // p * 2^floor(x)
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ), p, x);
}

#endif  // VA_HAS_DPBF

}  // namespace
