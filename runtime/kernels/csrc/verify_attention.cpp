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
// block, the row max / exp2 / row sums vectorised over query rows (AVX512-BF16: in the QK tiles,
// against the maximum of the chunks before, where every row sees the chunk; FusedP), then O[m] = O[m]*alpha +
// sum_c P[c][m] V[c] (register tile MR rows x DVG vectors over D). Q is pre-scaled by
// scale*log2(e) so the softmax uses exp2. Accumulation is fp32; bf16 K/V chunks are widened to
// fp32 in a small L1/L2-resident buffer first. With M <= 8 rows (k+1 <= 2 at g = 4) a vector
// would be mostly padding, so on AVX-512 the QK (fp32 FMAs, and AVX512-BF16 dot products on that
// path) splits each row's dot product over lanes instead (row-split QK: 16/Mq lanes a row, or on
// AVX512-BF16 at Mq <= 4 all 16 lanes of one accumulator per key and row, summed once per tile) and
// the scores are kept packed (Mq rows per key, 16/Mq keys per vector) through the softmax.
//
// Memory: the kernel streams K and V once, so at small N it is bound by how many cache lines
// one core keeps in flight. While a chunk computes, the chunks ahead (past an item's end: the
// first chunks of the item this thread runs next, claimed early for that) are requested into L2,
// spread evenly over the QK and PV work of the chunk: in bursts the requests fill the miss
// buffers, the ones past them are dropped, and memory and compute take turns instead of
// overlapping. Each line is requested twice (Prefetch), two chunks ahead and again one ahead.
//
// SIMD: GCC/Clang vector extensions of width W (16 floats with AVX-512, 8 with AVX, 4
// otherwise); the compiler maps them onto the target ISA (-march=native); AVX-512 intrinsics
// for the row-split QK and the bf16 widening. Head dims 32, 64, 96, 128, 256 have compile-time
// paths (D = 32, the bundled tiny model's: 1.3-2.5x the runtime-D path at its demo shapes); any other
// D runs the same algorithm with a runtime D.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
inline int team_size() { return omp_get_num_threads(); }
inline int thread_index() { return omp_get_thread_num(); }
#else
inline int team_size() { return 1; }
inline int thread_index() { return 0; }
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "verify_attention_common.h"
#include "verify_attention_fp32.h"
#include "verify_attention_bf16.h"  // the bf16 / fp16 KV paths: choice, Q and V packing
#include "verify_attention_dpbf.h"  // the AVX512-BF16 path
#include "verify_attention_amx.h"   // the AMX path and the bf16 paths' calls

namespace {

bool Workspace::ensure(const Args& a) {
  const size_t mb = std::min<int64_t>(a.Mp, 4 * W);
  const size_t cpad = size_t(max_chunk(a.C) + NACC);
  if (!(st.ensure(cpad * mb) && o.ensure(size_t(a.Mp) * a.D) && ml.ensure(size_t(4) * a.Mp) &&
        (a.qdt == 0 || qw.ensure(size_t(a.M) * a.D))))
    return false;
  if (a.path == PATH_FP32)
    return qt.ensure(size_t(a.D) * a.Mp) && kb.ensure(cpad * a.D) && vb.ensure(cpad * a.D);
  const FastDims fd(a, max_chunk(a.C));
  return qp.ensure(fd.qp) && qx.ensure(fd.qx) && kf.ensure(fd.kf) && vv.ensure(fd.vv) && pt.ensure(fd.pt) &&
         of.ensure(fd.of);
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

// One work item's state, shared by its chunks.
struct ItemState {
  FastDims fd;     // the bf16 paths' buffer dims
  bool fast;       // a bf16 path: QK and PV in verify_attention_bf16.h, _amx.h
  int R;           // row-split QK: lanes a row (0: none)
  int qparts;      // bf16 parts of Q on the fast paths
  int64_t head;    // element offset of K/V[slot, h, 0, 0]
  int64_t ldo;     // row stride of o
  float* o;        // [Mp][ldo] unnormalised output
  float *mrow, *lrow, *alpha;  // [Mp] each: running max, running sum, this chunk's rescale
};

// Q packed for the item's path, the accumulators zeroed.
template <int DT>
ItemState begin_item(const Args& a, const Item& it, Workspace& w) {
  const int64_t D = DT > 0 ? DT : a.D;
  const bool fast = a.path != PATH_FP32;
  ItemState s{FastDims(a, max_chunk(a.C)), fast, fast ? dpbf_split_lanes(a) : split_lanes(a.M, D, a.flags), 1,
              kv_head(a, it.b, it.h), 0, nullptr, w.ml.p, w.ml.p + a.Mp, w.ml.p + 2 * a.Mp};
  s.ldo = fast ? s.fd.Dv : D;
  s.o = fast ? w.of.p : w.o.p;
  const QRows qr = q_rows(a, it.b, it.h, w.qw);  // row m = i*g + j at qr.p + i*qr.tok + j*D
  if (fast) {
    s.qparts = pack_q(a, qr, max_q_parts(a.path), s.fd.Dp, reinterpret_cast<uint32_t*>(w.qp.p));
    if (s.R) pack_qx(reinterpret_cast<const uint32_t*>(w.qp.p), s.qparts, s.fd.Dp / 2, a.Mp, s.R,
                     reinterpret_cast<uint32_t*>(w.qx.p));
  } else
    pack_qt(a, qr, D, s.R, w.qt.p);
  std::memset(s.o, 0, sizeof(float) * a.Mp * s.ldo);
  for (int64_t m = 0; m < a.Mp; ++m) { s.mrow[m] = NEG_INF; s.lrow[m] = 0.0f; }
  return s;
}

// The rows of token rows p (elem bytes an element, tok elements apart) that (b, h) reads or writes:
// its N tokens' heads h*g .. h*g+g-1.
RowLines head_rows(const Args& a, const void* p, int64_t elem, int64_t tok, int64_t b, int64_t h, bool write) {
  RowLines r;
  r.p = static_cast<const char*>(p) + (first_token(a, b) * tok + h * a.g * a.D) * elem;
  r.bytes = a.g * a.D * elem;
  r.stride = tok * elem;
  r.rows = a.N;
  r.write = write;
  return r;
}

// The prefetch that chunk ci (nc keys) runs: the chunk `ahead` on and, a second time, the chunk
// after this one (see Prefetch), their lines requested at an even rate over row block 0's QK and PV
// (and on the fast paths the V packing and the P packing too), unit by unit. Two requests where the
// KV stream bounds the call: bf16 KV, and fp32 KV at M <= 8 rows (fp32 at k+1 = 1-2, g = 4:
// 1.06-1.17x; at M = 16-32, compute-bound, the extra requests cost 0.95-1.00x). The item's last
// chunk also requests, at the same even rate, the next item's q rows and this item's output rows.
template <int DT>
Prefetch chunk_prefetch(const Args& a, const Item& it, const ItemState& s, NextItem& next, int64_t ci,
                        int64_t nchunks, int64_t nc) {
  const int64_t D = DT > 0 ? DT : a.D;
  const int64_t ahead = a.kv || a.M <= 8 ? 2 : 1;
  const int64_t Mb = std::min<int64_t>(4 * W, a.Mp), rows = std::min<int64_t>(Mb, a.M);
  const int64_t kc_tile = s.R ? NACC : kc_for(int(Mb / W));
  const int64_t qk_units = (nc + kc_tile - 1) / kc_tile * ((D + 15) / 16) * (s.R ? NACC * 16 / s.R : NACC * 16);
  const float units = float(s.fast ? fast_units(a, s.fd, Mb, rows, nc, s.qparts, s.R) : qk_units + pv_units<DT>(rows, nc));
  Prefetch pf;
#ifdef VA_CHECK_UNITS
  pf.counted = int64_t(units);
#endif
  if (ci == nchunks - 1) {
    if (const Item* nx = next.get()) pf.side[0] = head_rows(a, a.q, a.qdt ? 2 : 4, a.q_tok, nx->b, nx->h, false);
    if (it.part < 0) pf.side[1] = head_rows(a, a.out, a.odt ? 2 : 4, a.out_tok, it.b, it.h, true);
    pf.side_rate = float(pf.side[0].lines() + pf.side[1].lines()) / units;
  }
  const ChunkLines first = chunk_lines(a, it, next, ci, nchunks, ahead);
  const ChunkLines again = ahead > 1 ? chunk_lines(a, it, next, ci, nchunks, 1) : ChunkLines{};
  if (!first.k && !again.k) return pf;
  pf.k = first.k;
  pf.end = first.k + first.lines * 64;
  pf.again = again.k;
  pf.again_end = again.k + again.lines * 64;
  pf.vdelta = static_cast<const char*>(a.v) - static_cast<const char*>(a.k);
  pf.rate_q16 = int64_t(std::ceil(double(std::max(first.lines, again.lines)) * 65536.0 / units));
  return pf;
}

// Keys c0 .. c0+nc of the item as its path reads them: fp32 rows in place or widened into kb / vb
// (kc, vc), or the fast paths' K rows and V pairs (fch, w.vv).
struct ChunkKV {
  const float *kc = nullptr, *vc = nullptr;
  FastChunk fch{};
};

template <int DT>
ChunkKV load_chunk(const Args& a, const ItemState& s, Workspace& w, int64_t c0, int64_t nc, Prefetch& pf) {
  const int64_t D = DT > 0 ? DT : a.D;
  ChunkKV ch;
  if (s.fast) {
    ch.fch = fast_chunk(a, s.fd, s.head, c0, nc, reinterpret_cast<uint16_t*>(w.kf.p), reinterpret_cast<uint32_t*>(w.vv.p), pf);
  } else if (a.kv) {
    const int64_t npad = (nc + NACC - 1) / NACC * NACC;
    widen_rows(static_cast<const uint16_t*>(a.k) + s.head + c0 * D, nc, D, w.kb.p, a.kv);
    std::memset(w.kb.p + nc * D, 0, sizeof(float) * (npad - nc) * D);
    widen_rows(static_cast<const uint16_t*>(a.v) + s.head + c0 * D, nc, D, w.vb.p, a.kv);
    ch.kc = w.kb.p;
    ch.vc = w.vb.p;
  } else {
    ch.kc = static_cast<const float*>(a.k) + s.head + c0 * D;
    ch.vc = static_cast<const float*>(a.v) + s.head + c0 * D;
  }
  return ch;
}

// One row block (rows mb0 .. mb0+Mb) against one chunk: QK, the causal mask, the online softmax, PV.
template <int DT>
void row_block(const Args& a, const Item& it, ItemState& s, Workspace& w, const ChunkKV& ch, int64_t c0,
               int64_t nc, int64_t mb0, Prefetch& pf) {
  const int64_t D = DT > 0 ? DT : a.D, g = a.g, ctx = a.ctx[it.b];
  const int64_t Mb = std::min<int64_t>(4 * W, a.Mp - mb0);
  const int mv = int(Mb / W);
  const int64_t rows = std::min<int64_t>(Mb, a.M - mb0);
  const int64_t Mq = s.R ? W / s.R : 0;  // row-split: rows per vector, scores packed st[c*Mq + m]
  const int64_t ld = s.R ? Mq : Mb;      // st row stride
  float* st = w.st.p;                    // [nc(+pad)][ld]
  uint32_t* pt = reinterpret_cast<uint32_t*>(w.pt.p);
  bool fused = false;
  if (s.fast && s.R) {  // row-split: packed scores, scaled as they are stored
    dpbf_qk_split(s.R, ch.fch.k, ch.fch.ldk, ch.fch.padded, nc, reinterpret_cast<const uint32_t*>(w.qx.p),
                  s.fd.Dp / 2, s.qparts, a.qscale, st, pf);
  } else if (s.fast && c0 + nc <= ctx + 1 &&  // every row sees every key: QK and softmax in one
             fast_qk_fused(a, s.fd, ch.fch, nc, reinterpret_cast<const uint32_t*>(w.qp.p) + mb0, s.qparts, mv,
                           s.mrow + mb0, s.lrow + mb0, s.alpha + mb0, pt, pf)) {
    fused = true;
  } else if (s.fast) {  // unscaled scores from bf16 Q parts, scaled in fp32 by the softmax (a positive scale)
    fast_qk(a, s.fd, ch.fch, nc, reinterpret_cast<const uint32_t*>(w.qp.p) + mb0, s.qparts, mv, st, pf);
    if (!(a.qscale > 0.0f)) {
      const vf sc = vsplat(a.qscale);
      for (int64_t i = 0; i < nc * Mb; i += W) vstore(st + i, vload(st + i) * sc);
    }
  } else if (s.R) {
    qk_split_dispatch<DT>(s.R, a, ch.kc, nc, a.kv == 0, w.qt.p, st, w.kb.p, pf);
  } else {
    qk_dispatch<DT>(mv, a, ch.kc, nc, a.kv == 0, w.qt.p + mb0, st, w.kb.p, pf);
  }
  // Causal mask inside the new block: key ctx+t is hidden from rows with i < t.
  for (int64_t c = std::max<int64_t>(0, ctx + 1 - c0); c < nc; ++c) {
    const int64_t hide = std::min<int64_t>((c0 + c - ctx) * g - mb0, ld);
    for (int64_t m = 0; m < hide; ++m) st[c * ld + m] = NEG_INF;
  }
  if (s.fast && s.R)
    softmax_packed_pairs(st, nc, Mq, s.mrow, s.lrow, s.alpha, pt);
  else if (s.R)
    softmax_packed(st, nc, Mq, s.mrow, s.lrow, s.alpha);
  else if (!fused)
    softmax_rows(a, s.fast, st, Mb, mv, nc, s.mrow + mb0, s.lrow + mb0, s.alpha + mb0, pt, pf);
  if (s.fast && s.R)
    dpbf_pv_split(Mq, rows, nc, ch.fch.v, a.D, a.kv, s.fd.Dv, s.alpha + mb0, s.o + mb0 * s.ldo, pt, pf);
  else if (s.fast)
    fast_pv(a, s.fd, st, Mb, rows, nc, ch.fch, reinterpret_cast<uint32_t*>(w.vv.p), mb0 > 0, s.alpha + mb0,
            s.o + mb0 * s.ldo, pt, pf);
  else
    pv_rows<DT>(rows, D, ch.vc, nc, st, ld, s.alpha + mb0, s.o + mb0 * D, pf);
}

// The item's rows normalised into out, or its partial result (O, row max, row sum) for the merge.
void finish_item(const Args& a, const Item& it, const ItemState& s, Workspace& w, float* part_o, float* part_ml) {
  const int64_t D = a.D, M = a.M;
  const float* o = s.o;
  if (a.path == PATH_DPBF) {  // AVX512-BF16 rows: back to d order (v_pairs), rows of D
    unpermute_rows(o, M, s.ldo, D, w.o.p);
    o = w.o.p;
  } else if (s.ldo != D) {  // AMX rows of Dv floats into rows of D
    for (int64_t m = 0; m < M; ++m) std::memcpy(w.o.p + m * D, o + m * s.ldo, sizeof(float) * D);
    o = w.o.p;
  }
  if (it.part < 0) {
    for (int64_t m = 0; m < M; ++m) store_row(a, it.b, it.h, m, o + m * D, 1.0f / s.lrow[m]);
  } else {
    std::memcpy(part_o + it.part * M * D, o, sizeof(float) * M * D);
    float* ml = part_ml + it.part * 2 * M;
    std::memcpy(ml, s.mrow, sizeof(float) * M);
    std::memcpy(ml + M, s.lrow, sizeof(float) * M);
  }
}

// One (sequence, KV head, key range): its keys in chunks, each chunk against every row block.
template <int DT>
void run_item(const Args& a, const Item& it, Workspace& w, float* part_o, float* part_ml, NextItem& next) {
  ItemState s = begin_item<DT>(a, it, w);
  const int64_t len = it.k1 - it.k0, nchunks = chunk_count(len, a.C);
  for (int64_t ci = 0; ci < nchunks; ++ci) {
    const int64_t c0 = it.k0 + ci * a.C, nc = chunk_len(len, a.C, nchunks, ci);
    Prefetch pf0 = chunk_prefetch<DT>(a, it, s, next, ci, nchunks, nc);
    const ChunkKV ch = load_chunk<DT>(a, s, w, c0, nc, pf0);
    for (int64_t mb0 = 0; mb0 < a.Mp; mb0 += 4 * W) {
      Prefetch idle;  // row block 0 carries the prefetch
      row_block<DT>(a, it, s, w, ch, c0, nc, mb0, mb0 == 0 ? pf0 : idle);
    }
    unit_check(pf0);
  }
  finish_item(a, it, s, w, part_o, part_ml);
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
  std::vector<Item> items;
  std::vector<Split> splits;
  const int64_t nparts = plan_items(a, nthreads, split_keys, items, splits);
  std::vector<float> part_o, part_ml;
  try {
    part_o.resize(size_t(nparts) * a.M * a.D);
    part_ml.resize(size_t(nparts) * 2 * a.M);
  } catch (...) {
    return -4;
  }
  int failed = 0;
  const int64_t nitems = int64_t(items.size());
  const int nt = small_call(a, nitems) ? 1 : int(std::max<int64_t>(1, std::min<int64_t>(nthreads, nitems)));
  int64_t counter = 0;  // next unclaimed item (claimed one ahead, see NextItem)
  Join done;            // threads past their items (and then past their merges)
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
    const int team = team_size();
    done.arrive();
    if (merging) {
      done.wait(team);  // every part written before a merge reads it
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t s = 0; s < int64_t(splits.size()); ++s)
        if (ok) merge(a, splits[s].b, splits[s].h, splits[s].first, splits[s].n, part_o.data(), part_ml.data(), w.o.p);
      done.arrive();
    }
    // The caller's thread reaches OpenMP's closing barrier last, so it never sleeps there (see Join).
    if (thread_index() == 0) done.spin_until(merging ? 2 * team : team, Join::SPIN_US);
  }
  return failed ? -4 : 0;
}

}  // namespace

#include "verify_attention_api.h"  // the C entry points
