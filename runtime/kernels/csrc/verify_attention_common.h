// Shared helpers of CPU verify attention (verify_attention.cpp includes this first): the vector
// width and types, 2^x, the prefetch pacer, the call's arguments, work items and buffers.
#pragma once


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
// The lines of a chunk are requested twice: first `ahead` (2) chunks on, then again one chunk on.
// A software prefetch never waits: when the core's queue of misses is full it is dropped (measured
// here: prefetcht1 issues at 99 GB/s from two cores, far past what DRAM serves), so at small k+1,
// where the KV stream is what bounds the call, many first requests were lost and their lines came
// by demand misses one chunk later, the core stalled on each. The second request finds the line
// in L2 or on its way, or asks again (bf16 KV 1.08-1.19x at k+1 = 1-2, 1.04-1.13x at k+1 = 4).
// Token rows requested beside the chunks in an item's last chunk: the next item's q rows (read by
// its start) and this item's output rows (written by its end, so the stores find their lines
// instead of each waiting for one): `rows` rows of `bytes` bytes, `stride` bytes apart.
struct RowLines {
  const char* p = nullptr;
  int64_t bytes = 0, stride = 0, rows = 0;
  bool write = false;
  int64_t row = 0, off = 0;  // the next line: row `row`, `off` bytes past its first line
  int64_t lines() const { return rows * ((bytes + 63) / 64 + 1); }  // at most: a row may straddle a line more
  inline bool issue() {  // requests the next line; false when every row is done
    if (row >= rows) return false;
    const char* first = p + row * stride;
    const char* x = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(first) & ~uintptr_t(63)) + off;
    if (write) __builtin_prefetch(x, 1, 2); else __builtin_prefetch(x, 0, 2);
    off += 64;
    if (x + 64 >= first + bytes) { off = 0; ++row; }
    return true;
  }
};

struct Prefetch {
  const char* k = nullptr;  // next K line to prefetch; nullptr: nothing to do
  const char* end = nullptr;
  const char* again = nullptr;  // next K line of the chunk requested a second time
  const char* again_end = nullptr;
  int64_t vdelta = 0;  // V cache offset from the K cache, bytes
  int64_t rate_q16 = 0;    // line pairs (of each of the two chunks) per unit of work, in 1/65536
  int64_t credit_q16 = 0;  // integer, so the credit's chain through every step is an add, a shift and
                           // a mask (a float credit puts a convert to int and back, ~15 cycles, on it)
  RowLines side[2];        // the item's last chunk: next q rows, this item's output rows
  float side_rate = 0.0f;  // side lines per unit of work (0: none left)
  float side_credit = 0.0f;
#ifdef VA_CHECK_UNITS
  int64_t stepped = 0, counted = 0;  // units the work passed to step, units chunk_prefetch counted
#endif
  inline void step(int units) {
#ifdef VA_CHECK_UNITS
    stepped += units;
#endif
    if (k < end || again < again_end) {
      credit_q16 += units * rate_q16;
      const int n = int(credit_q16 >> 16);
      credit_q16 &= 0xFFFF;
      for (int i = 0; i < n; ++i) {
        if (k < end) {
          __builtin_prefetch(k, 0, 2);
          __builtin_prefetch(k + vdelta, 0, 2);
          k += 64;
        }
        if (again < again_end) {
          __builtin_prefetch(again, 0, 2);
          __builtin_prefetch(again + vdelta, 0, 2);
          again += 64;
        }
      }
    }
    if (side_rate > 0.0f) side_step(units);
  }
  void side_step(int units) {
    for (side_credit += float(units) * side_rate; side_credit >= 1.0f; side_credit -= 1.0f)
      if (!side[0].issue() && !side[1].issue()) {
        side_rate = 0.0f;
        return;
      }
  }
};

// A build with -DVA_CHECK_UNITS checks the pacer's count of a chunk's work units (chunk_prefetch)
// against the units its work steps: a count too high leaves lines of the chunk ahead unrequested
// (they come by demand misses), one too low requests them early, and neither shows in the results.
// The info string then ends with " units=chunks/off/worst%": chunks checked, chunks off by more than
// 10%, the largest difference in % of the count.
#ifdef VA_CHECK_UNITS
inline int64_t g_unit_chunks = 0, g_unit_off = 0, g_unit_worst_pct = 0;
inline void unit_check(const Prefetch& pf) {
  if (pf.counted <= 0) return;
  const int64_t pct = (pf.stepped > pf.counted ? pf.stepped - pf.counted : pf.counted - pf.stepped) * 100 / pf.counted;
  __atomic_add_fetch(&g_unit_chunks, 1, __ATOMIC_RELAXED);
  if (pct > 10) __atomic_add_fetch(&g_unit_off, 1, __ATOMIC_RELAXED);
  for (int64_t w = __atomic_load_n(&g_unit_worst_pct, __ATOMIC_RELAXED); pct > w;)
    if (__atomic_compare_exchange_n(&g_unit_worst_pct, &w, pct, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) break;
}
#else
inline void unit_check(const Prefetch&) {}
#endif

}  // namespace

namespace {

// ---------------------------------------------------------------- work items and buffers

struct Args {
  const void* q;  // token rows, q_tok elements apart (the Layouts above)
  const void* k;
  const void* v;
  int kv;    // KV element type: 0 fp32, 1 bf16, 2 fp16
  int path;  // PATH_FP32, PATH_DPBF or PATH_AMX (verify_attention_bf16.h)
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
// Element offset of K/V[slots[b], h, 0, 0] in the caches.
inline int64_t kv_head(const Args& a, int64_t b, int64_t h) { return (a.slots[b] * a.Hkv + h) * a.S * a.D; }

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
  Buf qp, qx, kf, vv, pt, of;  // the bf16 paths' buffers (verify_attention_bf16.h)
  bool ensure(const Args& a);
};

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

// The lines of the chunk j chunks after chunk ci: in this item or else at the start of the next one.
struct ChunkLines {
  const char* k = nullptr;  // its first K line; nullptr: none (no next item, or it is shorter)
  int64_t lines = 0;
};
inline ChunkLines chunk_lines(const Args& a, const Item& it, NextItem& next, int64_t ci, int64_t nchunks, int64_t j) {
  const int64_t D = a.D, C = a.C, elem = a.kv ? 2 : 4;
  const char* kbytes = static_cast<const char*>(a.k);
  int64_t keys = 0;
  const char* k = nullptr;
  if (ci + j < nchunks) {
    keys = chunk_len(it.k1 - it.k0, C, nchunks, ci + j);
    k = kbytes + (kv_head(a, it.b, it.h) + (it.k0 + (ci + j) * C) * D) * elem;
  } else if (const Item* nx = next.get()) {
    const int64_t nlen = nx->k1 - nx->k0, nn = chunk_count(nlen, C), jn = ci + j - nchunks;
    if (jn < nn) {
      keys = chunk_len(nlen, C, nn, jn);
      k = kbytes + (kv_head(a, nx->b, nx->h) + (nx->k0 + jn * C) * D) * elem;
    }
  }
  return {k, k ? (keys * D * elem + 63) / 64 : 0};
}

// The threads of run_all's parallel region meeting on a counter. OpenMP's barriers, under the PASSIVE
// wait policy the engine sets (runtime/thread_env.py), put each thread that arrives early to sleep at
// once and wake it by an interrupt to its core: on a 2-core VM 12 us from the last thread's end to the
// call's return, against 1-2 us when the caller spins on this counter for the microseconds the other
// thread still needs (a few percent of a call at k+1 <= 4, context 512).
struct Join {
  static constexpr int64_t SPIN_US = 200;  // more than an item takes at the contexts where this matters
  int arrived = 0;
  void arrive() { __atomic_add_fetch(&arrived, 1, __ATOMIC_ACQ_REL); }
  bool reached(int n) const { return __atomic_load_n(&arrived, __ATOMIC_ACQUIRE) >= n; }
  // Whether n threads arrived within spin_us, spinning.
  bool spin_until(int n, int64_t spin_us) const {
    const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us);
    for (int i = 1; !reached(n); ++i) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      if (i % 64 == 0 && std::chrono::steady_clock::now() > end) return false;
    }
    return true;
  }
  // Until n threads arrived: spinning for SPIN_US, then sleeping 20 us at a time.
  void wait(int n) const {
    if (!spin_until(n, SPIN_US))
      while (!reached(n)) std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
};

// A split of (b, h) into n key ranges: parts first .. first+n-1 of the partial results.
struct Split {
  int64_t b, h, first, n;
};

// A call's query heads x the keys each of its query tokens sees, summed (4 D flops each: QK and PV).
inline double call_row_keys(const Args& a) {
  double w = 0.0;
  for (int64_t b = 0; b < a.B; ++b) w += double(a.N) * double(a.ctx[b]) + double(a.N * (a.N + 1) / 2);
  return w * double(a.Hq);
}

// A call small enough for the calling thread alone. Where idle OpenMP workers sleep
// (OMP_WAIT_POLICY=PASSIVE, as the engine and the bench run), waking one costs the caller a futex
// call and the worker 16-26 us before it starts (measured on a 2-core VM), so a call whose work one
// core does in about that time is slower on two threads (1.4-2.4x at 10-50 us: the groups of one
// prompt length of the engine's prefill, and its small draft calls). The estimate is one core's
// time, roughly: 50 GFLOP/s, 15 GB/s of KV and 1 us an item.
constexpr double SMALL_CALL_US = 30.0;
bool small_call(const Args& a, int64_t nitems) {
  static const bool passive = [] {
    const char* p = std::getenv("OMP_WAIT_POLICY");
    return p && (std::strcmp(p, "PASSIVE") == 0 || std::strcmp(p, "passive") == 0);
  }();
  if (!passive) return false;
  double kv_bytes = 0.0;
  const double elem = a.kv == 0 ? 4.0 : 2.0;
  for (int64_t b = 0; b < a.B; ++b) kv_bytes += 2.0 * double(a.ctx[b] + a.N) * double(a.Hkv) * double(a.D) * elem;
  const double flops = 4.0 * double(a.D) * call_row_keys(a);
  return flops / 5e4 + kv_bytes / 1.5e4 + double(nitems) < SMALL_CALL_US;
}

// The work items, largest first: long contexts split so that there are a few items per thread
// (balanced by keys; split_keys > 0: ranges of that many keys), each range a whole number of chunks.
// Returns the number of partial results the splits write.
int64_t plan_items(const Args& a, int nthreads, int64_t split_keys, std::vector<Item>& items, std::vector<Split>& splits) {
  int64_t total = 0;
  for (int64_t b = 0; b < a.B; ++b) total += a.Hkv * (a.ctx[b] + a.N);
  int64_t target = split_keys > 0 ? split_keys
                                  : std::max<int64_t>(4 * a.C, (total + 4 * nthreads - 1) / (4 * nthreads));
  target = (target + a.C - 1) / a.C * a.C;
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
  return nparts;
}

}  // namespace
