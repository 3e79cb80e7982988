// CPU verify attention for speculative decoding: N = k+1 query tokens per sequence against
// the sequence's cached keys plus the N new ones, causal only inside the new block.
//
// Dimension letters: B batch rows, N query tokens per sequence, Hq query heads, Hkv KV heads,
// g = Hq/Hkv query heads per KV head, D head dim, R cache rows, S cache capacity (positions),
// L = ctx+N keys of one sequence, M = g*N query rows of one (sequence, KV head), Mp = M rounded
// up to the vector width W, Mb <= 4W rows of one row block, C keys per chunk.
//
// Layouts: q and out are token rows of Hq*D elements, fp32 or bf16, q_tok / out_tok elements apart
// (any row stride: q may be a view of one buffer holding q, k and v per token); batch row b's N
// tokens are rows tok[b] .. tok[b]+N-1 (tok null: rows b*N.., i.e. q and out [B, N, Hq, D]
// contiguous). k/v cache [R, Hkv, S, D] fp32, bf16 or fp16, contiguous. Query row m = i*g + j of
// (b, h) is head h*g + j of token tok[b] + i; it sits at position ctx+i and sees keys 0..ctx+i.
// bf16 q rows are widened to fp32 per work item; bf16 output is rounded to nearest even.
//
// Work decomposition: items (sequence b, KV head h, key range) run in parallel (OpenMP threads
// claiming items largest first from a shared counter); a long context is split into several key
// ranges whose partial softmax results (unnormalised O, row max, row sum) are merged afterwards
// (split-K, flash-decoding), so B=1 with a long context still uses every thread. Inside an item
// the keys are walked in chunks of about C with an online softmax; all M = g*N query rows of the
// KV head share each chunk, so K and V are read from memory once per (sequence, KV head).
//
// Per chunk and row block: S^T[c][m] = K[c] . Q^T[:, m] (a small GEMM: key scalars broadcast,
// vectors over query rows, register tile KC keys x MV vectors), the causal mask on the new
// block, the row max / exp2 / row sums vectorised over query rows, then O[m] = O[m]*alpha +
// sum_c P[c][m] V[c] (register tile MR rows x DVG vectors over D). Q is pre-scaled by
// scale*log2(e) so the softmax uses exp2. Accumulation is fp32; bf16 K/V chunks are widened to
// fp32 in a small L1/L2-resident buffer first. With M <= 8 rows (k+1 <= 2 at g = 4) a vector
// would be mostly padding, so on AVX-512 the QK splits each row's dot product over 16/Mq lanes
// instead (row-split QK, below) and the scores are kept packed (Mq rows per key, 16/Mq keys per
// vector) through the softmax.
//
// Memory: the kernel streams K and V once, so at small N it is bound by how many cache lines
// one core keeps in flight. While a chunk computes, the next one (at an item's last chunk: the
// first chunk of the item this thread runs next, claimed early for that) is prefetched into L2,
// spread evenly over the QK and PV work of the chunk: in bursts the prefetches fill the line
// fill buffers and stall the FMAs, and memory and compute then take turns instead of
// overlapping.
//
// SIMD: GCC/Clang vector extensions of width W (16 floats with AVX-512, 8 with AVX, 4
// otherwise); the compiler maps them onto the target ISA (-march=native); AVX-512 intrinsics
// for the row-split QK and the bf16 widening. Head dims 64, 96, 128, 256 have compile-time
// paths; any other D runs the same algorithm with a runtime D.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VA_W 16
#define VA_NACC 24
#define VA_ISA "avx512"
#elif defined(__AVX__)
#define VA_W 8
#define VA_NACC 12
#define VA_ISA "avx"
#else
#define VA_W 4
#define VA_NACC 12
#define VA_ISA "vec128"
#endif

namespace {

constexpr int W = VA_W;        // floats per vector
constexpr int NACC = VA_NACC;  // accumulator vectors per register tile
typedef float vf __attribute__((vector_size(VA_W * 4)));
typedef int32_t vi __attribute__((vector_size(VA_W * 4)));
typedef uint32_t vu __attribute__((vector_size(VA_W * 4)));
typedef uint16_t vh __attribute__((vector_size(VA_W * 2)));

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr float LOG2E = 1.4426950408889634f;

inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf vsplat(float s) { return s - vf{}; }  // s - 0 == s exactly: folds to a broadcast
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf vload_bf16(const uint16_t* p) {
#if defined(__AVX512F__)
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (vf)_mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
#else
  vh h;
  std::memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu);
  return (vf)(u << 16);
#endif
}
inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float half_to_float(uint16_t h) {  // IEEE binary16
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  float f;
  if (e == 0x1F) {
    const uint32_t u = sign | 0x7F800000u | (m << 13);
    std::memcpy(&f, &u, 4);
  } else if (e == 0) {
    f = std::ldexp(float(m), -24);
    if (sign) f = -f;
  } else {
    const uint32_t u = sign | ((e + 112) << 23) | (m << 13);
    std::memcpy(&f, &u, 4);
  }
  return f;
}

// 2^x for x <= 0 (Cephes exp2f polynomial on [-0.5, 0.5], rel. error ~2e-7); exactly 0 for
// x < -126 (and -inf).
inline vf exp2_poly(vf f) {
  vf p = vsplat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  return p;
}
inline vf vexp2(vf x) {
#if defined(__AVX512F__)
  // round, polynomial, scale by 2^n (vscalefps); the compare zeroes x < -126 and -inf.
  const __m512 xv = (__m512)x;
  const __mmask16 keep = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
  const __m512 r = _mm512_roundscale_ps(xv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf p = exp2_poly(x - (vf)r);
  return (vf)_mm512_maskz_scalef_ps(keep, (__m512)p, r);
#else
  const vf lo = vsplat(-126.0f);
  const vi under = x < lo;
  x = under ? lo : x;
  const vf magic = vsplat(12582912.0f);  // 1.5 * 2^23: round to nearest integer
  const vf t = x + magic;
  const vf r = t - magic;
  const vi n = (vi)t - (vi)magic;
  const vf s = (vf)((n + 127) << 23);
  const vf res = exp2_poly(x - r) * s;
  return under ? vsplat(0.0f) : res;
#endif
}

// ---------------------------------------------------------------- register-tile kernels

constexpr int kc_for(int mv) { return NACC / mv; }  // keys per QK tile for MV row vectors
constexpr int dvg_for(int dv) {  // D-vectors per PV tile: divides dv, MR*G + G + 1 fit the registers
  int best = 1;
  for (int j = 1; j <= dv && j <= NACC / 6; ++j)
    if (dv % j == 0) best = j;
  return best;
}

// Prefetch of a chunk ahead while this one computes (the next item's first chunks while an
// item's last ones do). The chunk's K rows are one contiguous block, its V rows another; the
// work of this chunk calls step(units) as it goes and it requests the lines of both that are due
// by then at `rate` lines per unit, so the chunk is requested evenly over the whole of this one's
// work. fp32 path: the QK tiles (every 16-wide d step) and PV tiles (every 8 keys), a unit a vector
// FMA. The bf16 paths step far more often (AMX: after every TDPBF16PS, in the V and P packing
// too; see fast_units): requests in bursts left the memory idle between them (1.05-1.17x on the
// bench's shapes, every k+1 and context, against one step per tile loop iteration).
struct Prefetch {
  const char* k = nullptr;  // next K line to prefetch; nullptr: nothing to do
  const char* end = nullptr;
  int64_t vdelta = 0;  // V cache offset from the K cache, bytes
  float rate = 0.0f;   // line pairs per unit of work
  float credit = 0.0f;
  inline void step(int units) {
    if (k >= end) return;
    credit += float(units) * rate;
    const int n = int(credit);
    credit -= float(n);
    for (int i = 0; i < n; ++i) {
      __builtin_prefetch(k + 64 * i, 0, 2);
      __builtin_prefetch(k + 64 * i + vdelta, 0, 2);
    }
    k += 64 * n;
  }
};

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

// ---------------------------------------------------------------- work items and buffers

struct Args {
  const void* q;  // token rows, q_tok elements apart (the Layouts above)
  const void* k;
  const void* v;
  int kv;    // KV element type: 0 fp32, 1 bf16, 2 fp16
  int path;  // PATH_FP32, PATH_DPBF or PATH_AMX (verify_attention_bf16.cpp)
  const int64_t* slots;
  const int64_t* ctx;
  const int64_t* tok;  // first token row of each batch row (null: b*N)
  void* out;
  int qdt, odt;            // q / out element type: 0 fp32, 1 bf16
  int64_t q_tok, out_tok;  // elements from one token row to the next
  int64_t B, N, Hq, Hkv, D, R, S, g, M, Mp;
  float qscale;  // scale * log2(e)
  int64_t C;     // keys per chunk (multiple of every KC on the fp32 path, of 16 on the others)
  int flags;     // bit 0: runtime-D path; bit 1: no row-split QK
};

inline int64_t first_token(const Args& a, int64_t b) { return a.tok ? a.tok[b] : b * a.N; }

// The M query rows of (b, h) as fp32: row m = i*g + j at p + i*tok + j*D.
struct QRows {
  const float* p;
  int64_t tok;
};

struct Item {
  int64_t b, h, k0, k1;
  int64_t part;  // -1: write the output directly; else index of its partial result
};

struct Buf {  // 64-byte aligned, grows only
  float* p = nullptr;
  size_t n = 0;
  ~Buf() { std::free(p); }
  bool ensure(size_t want) {
    if (want <= n) return true;
    std::free(p);
    size_t bytes = ((want * sizeof(float) + 63) / 64) * 64;
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
    n = p ? want : 0;
    return p != nullptr;
  }
};

// An item of `len` keys is walked in round(len / C) chunks (at least one): C keys each, the last
// one takes the rest (C/2 .. 3C/2 - 1 keys), so there is no short tail chunk at the end of an
// item, whose compute would be too short to hide the prefetch of the next chunk.
inline int64_t max_chunk(int64_t C) { return C + C / 2; }
inline int64_t chunk_count(int64_t len, int64_t C) { return std::max<int64_t>(1, (len + C / 2) / C); }
inline int64_t chunk_len(int64_t len, int64_t C, int64_t n, int64_t i) { return i + 1 < n ? C : len - i * C; }

struct Workspace {
  Buf qt, st, o, ml, kb, vb, qw;  // qw: bf16 q rows widened
  Buf qp, kf, vv, pt, of;  // the bf16 paths' buffers (verify_attention_bf16.cpp)
  bool ensure(const Args& a);
};

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

}  // namespace

#include "verify_attention_bf16.cpp"  // the AMX and AVX512-BF16 paths for bf16 / fp16 KV

namespace {

// Online softmax update of one row block (st [nc][Mb], mv vectors of W rows; mrow, lrow, alpha at the
// block's first row), vectorised over query rows. The scores are scaled by sc here (the fast paths'
// unscaled scores; 1 otherwise): sc > 0, so the scaled maximum is sc * the maximum. The AMX path
// writes the probabilities straight into its P pairs pt, the others back into st.
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
    if (fast) {  // AVX512-BF16: P is rounded to bf16 for PV, so 2^x to bf16's precision
      for (int64_t c = 0; c < nc; ++c) {
        const vf pc = (vf)exp2_bf16((__m512)(vload(st + c * Mb + v * W) * sc - ms));
        vstore(st + c * Mb + v * W, pc);
        sum += pc;
      }
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

// Work units (vector FMAs, rounded up to 8 keys) that pv_rows passes to Prefetch::step().
template <int DT>
inline int64_t pv_units(int64_t rows, int64_t nc) {
  if constexpr (DT > 0 && DT % W == 0) {
    return rows * (DT / W) * ((nc + 7) / 8 * 8);
  } else {
    return 0;
  }
}

// The work item a thread runs after the current one, claimed from the shared counter only when
// it is first needed (for the prefetch of its first chunk, or when the current item is done).
struct NextItem {
  const Item* items;
  int64_t nitems;
  int64_t* counter;  // shared: index of the next unclaimed item
  int64_t claimed = -1;
  const Item* get() {
    if (claimed < 0) {
      int64_t t;
#pragma omp atomic capture
      t = (*counter)++;
      claimed = t;
    }
    return claimed < nitems ? items + claimed : nullptr;
  }
};

bool Workspace::ensure(const Args& a) {
  const size_t mb = std::min<int64_t>(a.Mp, 4 * W);
  const size_t cpad = size_t(max_chunk(a.C) + NACC);
  if (!(st.ensure(cpad * mb) && o.ensure(size_t(a.Mp) * a.D) && ml.ensure(size_t(4) * a.Mp) &&
        (a.qdt == 0 || qw.ensure(size_t(a.M) * a.D))))
    return false;
  if (a.path == PATH_FP32)
    return qt.ensure(size_t(a.D) * a.Mp) && kb.ensure(cpad * a.D) && vb.ensure(cpad * a.D);
  const FastDims fd(a, max_chunk(a.C));
  return qp.ensure(fd.qp) && kf.ensure(fd.kf) && vv.ensure(fd.vv) && pt.ensure(fd.pt) && of.ensure(fd.of);
}

// The query rows of (b, h) in place (fp32 q) or widened into `wide` (bf16 q).
QRows q_rows(const Args& a, int64_t b, int64_t h, Buf& wide) {
  const int64_t D = a.D, g = a.g, base = first_token(a, b) * a.q_tok + h * g * D;
  if (a.qdt == 0) return {static_cast<const float*>(a.q) + base, a.q_tok};
  const uint16_t* src = static_cast<const uint16_t*>(a.q) + base;
  for (int64_t i = 0; i < a.N; ++i) widen_rows(src + i * a.q_tok, g, D, wide.p + i * g * D, 1);
  return {wide.p, g * D};
}

// Output row m = i*g + j of (b, h): src * scale into head h*g + j of token tok[b] + i.
inline void store_row(const Args& a, int64_t b, int64_t h, int64_t m, const float* src, float scale) {
  const int64_t off = (first_token(a, b) + m / a.g) * a.out_tok + (h * a.g + m % a.g) * a.D;
  if (a.odt == 0) {
    float* dst = static_cast<float*>(a.out) + off;
#pragma omp simd
    for (int64_t d = 0; d < a.D; ++d) dst[d] = src[d] * scale;
  } else {
    uint16_t* dst = static_cast<uint16_t*>(a.out) + off;
    for (int64_t d = 0; d < a.D; ++d) dst[d] = float_to_bf16(src[d] * scale);
  }
}

template <int DT>
void run_item(const Args& a, const Item& it, Workspace& w, float* part_o, float* part_ml, NextItem& next) {
  const int64_t D = DT > 0 ? DT : a.D;
  const int64_t g = a.g, M = a.M, Mp = a.Mp, C = a.C;
  const int64_t ctx = a.ctx[it.b];
  const int64_t slot = a.slots[it.b];
  float* qt = w.qt.p;  // [D][Mp]
  const bool fast = a.path != PATH_FP32;  // the bf16 paths: QK and PV in verify_attention_bf16.cpp
  const FastDims fd(a, max_chunk(C));
  const int64_t ldo = fast ? fd.Dv : D;
  float* o = fast ? w.of.p : w.o.p;  // [Mp][ldo]
  float* mrow = w.ml.p;
  float* lrow = mrow + Mp;
  float* alpha = lrow + Mp;

  // Q^T of the M rows, pre-scaled, padded rows zero: qt[d][m], or for the row-split QK
  // qt[t][m*R + j] = q[m][t*R + j].
  const int R = split_lanes(M, D, a.flags | (fast ? 2 : 0));
  const int64_t Mq = R ? W / R : 0;  // row-split: rows per vector, scores packed st[c*Mq + m]
  const QRows qr = q_rows(a, it.b, it.h, w.qw);  // row m = i*g + j at qr.p + i*qr.tok + j*D
#if defined(__AVX512F__)
  // One gather per vector of qt, contiguous stores (row by row the scalar stores would be
  // scattered). Offsets are int32: fine for q up to 2^31 floats past this (b, h).
  const bool gather = a.N * qr.tok + g * D < (int64_t(1) << 31);
#else
  const bool gather = false;
#endif
  int qparts = 1;  // bf16 parts of Q on the fast paths
  if (fast) {
    qparts = pack_q(a, qr, max_q_parts(a.path), fd.Dp, reinterpret_cast<uint32_t*>(w.qp.p));
  } else if (gather) {
#if defined(__AVX512F__)
    const float* q0 = qr.p;
    const __m512 sc = _mm512_set1_ps(a.qscale);
    auto row_off = [&](int64_t m) { return m / g * qr.tok + m % g * D; };
    alignas(64) int32_t off[16];
    if (R) {  // lane l = m*R + j of qt[t] holds q[m][t*R + j]
      for (int64_t l = 0; l < 16; ++l) off[l] = int32_t(row_off(std::min<int64_t>(l / R, M - 1)) + l % R);
      const __m512i idx = _mm512_load_si512(off);
      const __mmask16 valid = __mmask16((1u << (M * R)) - 1);  // M*R <= 16 (split_lanes)
      for (int64_t t = 0; t < D / R; ++t)
        _mm512_storeu_ps(qt + t * W, _mm512_mul_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, idx, q0 + t * R, 4), sc));
    } else {  // lanes of qt[d][m0 .. m0+15] are rows
      for (int64_t m0 = 0; m0 < Mp; m0 += 16) {
        for (int64_t l = 0; l < 16; ++l) off[l] = int32_t(row_off(std::min<int64_t>(m0 + l, M - 1)));
        const __m512i idx = _mm512_load_si512(off);
        const __mmask16 valid = __mmask16(M - m0 >= 16 ? 0xFFFF : (1u << (M - m0)) - 1);
        for (int64_t d = 0; d < D; ++d)
          _mm512_storeu_ps(qt + d * Mp + m0, _mm512_mul_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, idx, q0 + d, 4), sc));
      }
    }
#endif
  } else {
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
  std::memset(o, 0, sizeof(float) * Mp * ldo);
  for (int64_t m = 0; m < Mp; ++m) { mrow[m] = NEG_INF; lrow[m] = 0.0f; }

  const int64_t head = (slot * a.Hkv + it.h) * a.S * D;  // element offset of K/V[slot, h, 0, 0]
  const bool direct = a.kv == 0;
  const int64_t elem = a.kv ? 2 : 4;
  const char* kbytes = static_cast<const char*>(a.k);
  const int64_t vdelta = static_cast<const char*>(a.v) - kbytes;
  const int64_t ahead = a.kv ? 2 : 1;  // chunks ahead: about the same number of bytes
  const int64_t len = it.k1 - it.k0;
  const int64_t nchunks = chunk_count(len, C);
  for (int64_t ci = 0; ci < nchunks; ++ci) {
    const int64_t c0 = it.k0 + ci * C;
    const int64_t nc = chunk_len(len, C, nchunks, ci);
    // The chunk to prefetch: `ahead` chunks on, in this item or else at the start of the next.
    const char* pf_k = nullptr;
    int64_t pf_keys = 0;
    if (ci + ahead < nchunks) {
      pf_keys = chunk_len(len, C, nchunks, ci + ahead);
      pf_k = kbytes + (head + (c0 + ahead * C) * D) * elem;
    } else if (const Item* nx = next.get()) {
      const int64_t nlen = nx->k1 - nx->k0, nn = chunk_count(nlen, C), j = ci + ahead - nchunks;
      if (j < nn) {
        pf_keys = chunk_len(nlen, C, nn, j);
        pf_k = kbytes + ((a.slots[nx->b] * a.Hkv + nx->h) * a.S * D + (nx->k0 + j * C) * D) * elem;
      }
    }
    // Its lines are requested at an even rate over this chunk's work: row block 0's QK and PV (and
    // on the fast paths the V packing and the P packing too), unit by unit (see Prefetch).
    Prefetch pf0;
    if (pf_k) {
      const int64_t Mb = std::min<int64_t>(4 * W, Mp), rows = std::min<int64_t>(Mb, M);
      const int64_t lines = (pf_keys * D * elem + 63) / 64;
      const int64_t kc_tile = R ? NACC : kc_for(int(Mb / W));
      const int64_t qk_units = (nc + kc_tile - 1) / kc_tile * ((D + 15) / 16) * (R ? NACC * 16 / R : NACC * 16);
      pf0.k = pf_k;
      pf0.end = pf0.k + lines * 64;
      pf0.vdelta = vdelta;
      pf0.rate = float(lines) / float(fast ? fast_units(a, fd, Mb, rows, nc, qparts) : qk_units + pv_units<DT>(rows, nc));
    }
    const float *kc = nullptr, *vc = nullptr;
    FastChunk fch{};
    uint32_t* vv = reinterpret_cast<uint32_t*>(w.vv.p);
    if (fast) {
      fch = fast_chunk(a, fd, head, c0, nc, reinterpret_cast<uint16_t*>(w.kf.p), vv, pf0);
    } else if (a.kv) {
      const int64_t npad = (nc + NACC - 1) / NACC * NACC;
      widen_rows(static_cast<const uint16_t*>(a.k) + head + c0 * D, nc, D, w.kb.p, a.kv);
      std::memset(w.kb.p + nc * D, 0, sizeof(float) * (npad - nc) * D);
      widen_rows(static_cast<const uint16_t*>(a.v) + head + c0 * D, nc, D, w.vb.p, a.kv);
      kc = w.kb.p;
      vc = w.vb.p;
    } else {
      kc = static_cast<const float*>(a.k) + head + c0 * D;
      vc = static_cast<const float*>(a.v) + head + c0 * D;
    }
    for (int64_t mb0 = 0; mb0 < Mp; mb0 += 4 * W) {
      const int64_t Mb = std::min<int64_t>(4 * W, Mp - mb0);
      const int mv = int(Mb / W);
      const int64_t rows = std::min<int64_t>(Mb, M - mb0);
      const int64_t ld = R ? Mq : Mb;  // st row stride
      float* st = w.st.p;  // [nc(+pad)][ld]
      Prefetch idle;
      Prefetch& pf = mb0 == 0 ? pf0 : idle;
      if (fast) {  // unscaled scores from bf16 Q parts, scaled in fp32 by the softmax (a positive scale)
        fast_qk(a, fd, fch, nc, reinterpret_cast<const uint32_t*>(w.qp.p) + mb0, qparts, mv, st, pf);
        if (!(a.qscale > 0.0f)) {
          const vf sc = vsplat(a.qscale);
          for (int64_t i = 0; i < nc * Mb; i += W) vstore(st + i, vload(st + i) * sc);
        }
      }
      else if (R)
        qk_split_dispatch<DT>(R, a, kc, nc, direct, qt, st, w.kb.p, pf);
      else
        qk_dispatch<DT>(mv, a, kc, nc, direct, qt + mb0, st, w.kb.p, pf);
      // Causal mask inside the new block: key ctx+t is hidden from rows with i < t.
      for (int64_t c = std::max<int64_t>(0, ctx + 1 - c0); c < nc; ++c) {
        const int64_t hide = std::min<int64_t>((c0 + c - ctx) * g - mb0, R ? Mq : Mb);
        for (int64_t m = 0; m < hide; ++m) st[c * ld + m] = NEG_INF;
      }
      if (R) {
        // Online softmax on the packed scores: lane l of every vector is row l % Mq.
        const int64_t n = nc * Mq, nv = (n + W - 1) / W;
        for (int64_t i = n; i < nv * W; ++i) st[i] = NEG_INF;
        vf cm = vsplat(NEG_INF);
        for (int64_t v = 0; v < nv; ++v) cm = vmax(cm, vload(st + v * W));
        alignas(64) float lane[W], pat[W];
        vstore(lane, cm);
        for (int64_t m = 0; m < Mq; ++m) {
          float mx = lane[m];
          for (int64_t l = m + Mq; l < W; l += Mq) mx = std::max(mx, lane[l]);
          const float mnew = std::max(mrow[m], mx);
          const float ms = mnew == NEG_INF ? 0.0f : mnew;
          alpha[m] = std::exp2(mrow[m] - ms);
          mrow[m] = mnew;
          for (int64_t l = m; l < W; l += Mq) pat[l] = ms;
        }
        const vf msv = vload(pat);
        vf sum = vf{};
        for (int64_t v = 0; v < nv; ++v) {
          const vf pc = vexp2(vload(st + v * W) - msv);
          vstore(st + v * W, pc);
          sum += pc;
        }
        vstore(lane, sum);
        for (int64_t m = 0; m < Mq; ++m) {
          float sm = 0.0f;
          for (int64_t l = m; l < W; l += Mq) sm += lane[l];
          lrow[m] = lrow[m] * alpha[m] + sm;
        }
      } else {
        softmax_rows(a, fast, st, Mb, mv, nc, mrow + mb0, lrow + mb0, alpha + mb0, reinterpret_cast<uint32_t*>(w.pt.p), pf);
      }
      if (fast)
        fast_pv(a, fd, st, Mb, rows, nc, vv, alpha + mb0, o + mb0 * ldo, reinterpret_cast<uint32_t*>(w.pt.p), pf);
      else
        pv_rows<DT>(rows, D, vc, nc, st, ld, alpha + mb0, o + mb0 * D, pf);
    }
  }
  if (ldo != D) {  // the fast paths' rows of Dv floats into rows of D
    for (int64_t m = 0; m < M; ++m) std::memcpy(w.o.p + m * D, o + m * ldo, sizeof(float) * D);
    o = w.o.p;
  }

  if (it.part < 0) {
    for (int64_t m = 0; m < M; ++m) store_row(a, it.b, it.h, m, o + m * D, 1.0f / lrow[m]);
  } else {
    std::memcpy(part_o + it.part * M * D, o, sizeof(float) * M * D);
    float* ml = part_ml + it.part * 2 * M;
    std::memcpy(ml, mrow, sizeof(float) * M);
    std::memcpy(ml + M, lrow, sizeof(float) * M);
  }
}

// Combine the partial results of one (b, h) split into `nsplit` key ranges.
void merge(const Args& a, int64_t b, int64_t h, int64_t first, int64_t nsplit, const float* part_o,
           const float* part_ml, float* acc /* [D] scratch */) {
  const int64_t D = a.D, M = a.M;
  for (int64_t m = 0; m < M; ++m) {
    float mstar = NEG_INF;
    for (int64_t s = 0; s < nsplit; ++s) mstar = std::max(mstar, part_ml[(first + s) * 2 * M + m]);
    std::fill(acc, acc + D, 0.0f);
    float l = 0.0f;
    for (int64_t s = 0; s < nsplit; ++s) {
      const float* ml = part_ml + (first + s) * 2 * M;
      if (ml[m] == NEG_INF) continue;
      const float wgt = std::exp2(ml[m] - mstar);
      l += wgt * ml[M + m];
      const float* os = part_o + ((first + s) * M + m) * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += wgt * os[d];
    }
    store_row(a, b, h, m, acc, 1.0f / l);
  }
}

template <int DT>
int run_all(const Args& a, int nthreads, int64_t split_keys) {
  // Split long contexts so that there are a few items per thread (balance by keys).
  int64_t total = 0;
  for (int64_t b = 0; b < a.B; ++b) total += a.Hkv * (a.ctx[b] + a.N);
  int64_t target = split_keys > 0 ? split_keys
                                  : std::max<int64_t>(4 * a.C, (total + 4 * nthreads - 1) / (4 * nthreads));
  target = (target + a.C - 1) / a.C * a.C;
  std::vector<Item> items;
  struct Split { int64_t b, h, first, n; };
  std::vector<Split> splits;
  int64_t nparts = 0;
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t L = a.ctx[b] + a.N;
    const int64_t ns = (L + target - 1) / target;
    const int64_t len = ((L + ns - 1) / ns + a.C - 1) / a.C * a.C;
    for (int64_t h = 0; h < a.Hkv; ++h) {
      if (ns <= 1) {
        items.push_back({b, h, 0, L, -1});
        continue;
      }
      int64_t n = 0, first = nparts;
      for (int64_t k0 = 0; k0 < L; k0 += len, ++n) items.push_back({b, h, k0, std::min(L, k0 + len), nparts++});
      splits.push_back({b, h, first, n});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& x, const Item& y) { return x.k1 - x.k0 > y.k1 - y.k0; });
  std::vector<float> part_o, part_ml;
  try {
    part_o.resize(size_t(nparts) * a.M * a.D);
    part_ml.resize(size_t(nparts) * 2 * a.M);
  } catch (...) {
    return -4;
  }
  int failed = 0;
  const int64_t nitems = int64_t(items.size());
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, nitems)));
  int64_t counter = 0;  // next unclaimed item (claimed one ahead, see NextItem)
  const bool merging = !splits.empty();
#pragma omp parallel num_threads(nt)
  {
    static thread_local Workspace w;
    const bool ok = w.ensure(a);
    if (a.path == PATH_AMX) amx_begin();  // per thread: the tile configuration
    if (!ok) {
#pragma omp atomic write
      failed = 1;
    }
    NextItem cur{items.data(), nitems, &counter};
    for (const Item* it = cur.get(); it; it = cur.get()) {
      NextItem next{items.data(), nitems, &counter};
      if (ok) run_item<DT>(a, *it, w, part_o.data(), part_ml.data(), next);
      cur = next;  // claimed during the item (for its prefetch) or claimed now
    }
    if (a.path == PATH_AMX) amx_end();
    if (merging) {
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
      for (int64_t s = 0; s < int64_t(splits.size()); ++s)
        if (ok) merge(a, splits[s].b, splits[s].h, splits[s].first, splits[s].n, part_o.data(), part_ml.data(), w.o.p);
    }
  }
  return failed ? -4 : 0;
}

}  // namespace

extern "C" {

// Returns 0 on success; negative on bad arguments (-1 sizes, -2 slot, -3 ctx, -6 token offset),
// allocation failure (-4) or a requested path this machine lacks (-5). Nothing is written on a bad
// argument. kv_dtype: 0 fp32, 1 bf16, 2 fp16. num_threads <= 0: OpenMP default. chunk_keys <= 0:
// default chunk; split_keys <= 0: automatic split-K; flags bit 0: force the runtime-D path,
// bit 1: never use the row-split QK, bits 2-3: the path for bf16 / fp16 KV (0 the best this
// machine offers, 1 fp32, 2 AVX512-BF16, 3 AMX; fp32 KV always takes the fp32 path).
// q_dtype / out_dtype: 0 fp32, 1 bf16; q_tok / out_tok: elements from one token row to the next
// (>= Hq*D); tokens: the first row of each batch row's N tokens in q and out (null: b*N), all of
// them inside the T rows that q and out both have.
int specmoe_verify_attention_tokens(const void* q, int32_t q_dtype, int64_t q_tok, const void* k_cache,
                                    const void* v_cache, int32_t kv_dtype, const int64_t* slots,
                                    const int64_t* ctx_lens, const int64_t* tokens, int64_t T, void* out,
                                    int32_t out_dtype,
                                    int64_t out_tok, int64_t B, int64_t N, int64_t Hq, int64_t Hkv, int64_t D,
                                    int64_t R, int64_t S, float scale, int32_t num_threads,
                                    int64_t chunk_keys, int64_t split_keys, int32_t flags) {
  if (kv_dtype < 0 || kv_dtype > 2 || q_dtype < 0 || q_dtype > 1 || out_dtype < 0 || out_dtype > 1) return -1;
  int path = (flags >> 2) & 3;
  if (kv_dtype != 0 && path != PATH_AUTO && !((available_paths() >> path) & 1)) return -5;
  if (B < 0 || N < 1 || Hq < 1 || Hkv < 1 || D < 1 || R < 1 || S < 1 || Hq % Hkv != 0) return -1;
  if (q_tok < Hq * D || out_tok < Hq * D) return -1;
  if (B == 0) return 0;
  if (!q || !k_cache || !v_cache || !slots || !ctx_lens || !out) return -1;
  for (int64_t b = 0; b < B; ++b) {
    if (slots[b] < 0 || slots[b] >= R) return -2;
    if (ctx_lens[b] < 0 || ctx_lens[b] > S - N) return -3;
    const int64_t t0 = tokens ? tokens[b] : b * N;
    if (t0 < 0 || t0 + N > T) return -6;
  }
  Args a;
  a.q = q; a.k = k_cache; a.v = v_cache; a.kv = kv_dtype;
  a.path = kv_dtype == 0 ? PATH_FP32 : path == PATH_AUTO ? best_path() : path;
  a.slots = slots; a.ctx = ctx_lens; a.tok = tokens; a.out = out;
  a.qdt = q_dtype; a.odt = out_dtype; a.q_tok = q_tok; a.out_tok = out_tok;
  a.B = B; a.N = N; a.Hq = Hq; a.Hkv = Hkv; a.D = D; a.R = R; a.S = S;
  a.g = Hq / Hkv; a.M = a.g * N; a.Mp = (a.M + W - 1) / W * W;
  a.qscale = scale * LOG2E;
  a.flags = flags;
  constexpr int64_t LCM = NACC;  // every KC = NACC/MV divides NACC (MV in 1..4)
  const int64_t want = chunk_keys > 0 ? chunk_keys : 64;
  a.C = std::max<int64_t>(LCM, (want + LCM - 1) / LCM * LCM);
  if (a.path != PATH_FP32)  // tiles of 16 keys (AMX PV: 32), any tail handled
    a.C = std::max<int64_t>(16, (chunk_keys > 0 ? chunk_keys : FAST_CHUNK) + 15) / 16 * 16;
  int nt = num_threads;
#ifdef _OPENMP
  if (nt <= 0) nt = omp_get_max_threads();
#else
  nt = 1;
#endif
  try {  // allocation failures outside the parallel region surface as -4, never as a crash
    if (flags & 1) return run_all<0>(a, nt, split_keys);
    switch (D) {
      case 64: return run_all<64>(a, nt, split_keys);
      case 96: return run_all<96>(a, nt, split_keys);
      case 128: return run_all<128>(a, nt, split_keys);
      case 256: return run_all<256>(a, nt, split_keys);
      default: return run_all<0>(a, nt, split_keys);
    }
  } catch (...) {
    return -4;
  }
}

// q and out [B, N, Hq, D] fp32, contiguous (the arguments above otherwise).
int specmoe_verify_attention(const float* q, const void* k_cache, const void* v_cache,
                             int32_t kv_dtype, const int64_t* slots, const int64_t* ctx_lens,
                             float* out, int64_t B, int64_t N, int64_t Hq, int64_t Hkv, int64_t D,
                             int64_t R, int64_t S, float scale, int32_t num_threads,
                             int64_t chunk_keys, int64_t split_keys, int32_t flags) {
  return specmoe_verify_attention_tokens(q, 0, Hq * D, k_cache, v_cache, kv_dtype, slots, ctx_lens, nullptr, B * N,
                                         out, 0, Hq * D, B, N, Hq, Hkv, D, R, S, scale, num_threads, chunk_keys,
                                         split_keys, flags);
}

// "isa=avx512 width=16 openmp=1 max_threads=2 paths=amx,avx512bf16,fp32": paths are those the
// bf16 / fp16 KV can take here, best first.
const char* specmoe_verify_attention_info() {
  static char buf[192];
  int mt = 1, omp = 0;
#ifdef _OPENMP
  mt = omp_get_max_threads();
  omp = 1;
#endif
  const unsigned p = available_paths();
  std::snprintf(buf, sizeof buf, "isa=%s width=%d openmp=%d max_threads=%d paths=%s%sfp32", VA_ISA, W, omp, mt,
                (p >> PATH_AMX) & 1 ? "amx," : "", (p >> PATH_DPBF) & 1 ? "avx512bf16," : "");
  return buf;
}

}  // extern "C"
