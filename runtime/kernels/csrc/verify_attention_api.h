// The C entry points of the verify-attention kernel (verify_attention.cpp includes this last).
//
//   specmoe_verify_attention_tokens  N query tokens for every batch row, on token-major rows
//   specmoe_verify_attention_ragged  the same with each batch row's own count n[b] (a prefill pass of
//                                    prompts of many lengths, a draft step whose sequences catch up
//                                    by different numbers of tokens): one call for the whole pass
//   specmoe_verify_attention         q and out [B, N, Hq, D] fp32, contiguous
//   specmoe_verify_attention_info    what this build offers
//
// A ragged call runs its rows grouped by count, each group as a tokens call of that N (the kernel's
// tiles and its causal block are shaped by N): the same arithmetic as a call per count, without the
// caller's per-call work (argument checks, a foreign call, index plans). Groups none of which holds
// more than a thread's share of the work (a prefill of many prompt lengths) run side by side, one
// thread each; else one after another, each on the whole team.
// Every argument is checked before any memory access; nothing is written on a bad argument.

namespace {

// The sizes and element types every entry point shares: 0, or the error code.
int check_sizes(int32_t q_dtype, int32_t kv_dtype, int32_t out_dtype, int64_t q_tok, int64_t out_tok, int64_t B,
                int64_t Hq, int64_t Hkv, int64_t D, int64_t R, int64_t S, int32_t flags) {
  if (kv_dtype < 0 || kv_dtype > 2 || q_dtype < 0 || q_dtype > 1 || out_dtype < 0 || out_dtype > 1) return -1;
  const int path = (flags >> 2) & 3;
  if (kv_dtype != 0 && path != PATH_AUTO && !((available_paths() >> path) & 1)) return -5;
  if (B < 0 || Hq < 1 || Hkv < 1 || D < 1 || R < 1 || S < 1 || Hq % Hkv != 0) return -1;
  if (q_tok < Hq * D || out_tok < Hq * D) return -1;
  return 0;
}

// Batch row b's slot, cached length and token rows (N of them from t0), against the cache and the T rows.
inline int check_row(int64_t slot, int64_t ctx, int64_t t0, int64_t N, int64_t R, int64_t S, int64_t T) {
  if (slot < 0 || slot >= R) return -2;
  if (ctx < 0 || ctx > S - N) return -3;
  if (t0 < 0 || t0 + N > T) return -6;
  return 0;
}

// The arguments of one uniform-N call (the pointers index its B batch rows).
Args make_args(const void* q, int32_t q_dtype, int64_t q_tok, const void* k_cache, const void* v_cache,
               int32_t kv_dtype, const int64_t* slots, const int64_t* ctx_lens, const int64_t* tokens, void* out,
               int32_t out_dtype, int64_t out_tok, int64_t B, int64_t N, int64_t Hq, int64_t Hkv, int64_t D,
               int64_t R, int64_t S, float scale, int64_t chunk_keys, int32_t flags) {
  const int path = (flags >> 2) & 3;
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
    a.C = std::max<int64_t>(16, (chunk_keys > 0 ? chunk_keys : fast_chunk_keys(a.path, a.M)) + 15) / 16 * 16;
  return a;
}

// Threads a call may use: num_threads, or OpenMP's default where <= 0 (1 without OpenMP).
int resolve_threads(int32_t num_threads) {
#ifdef _OPENMP
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  return 1;
#endif
}

// Runs one uniform-N call on at most num_threads threads (<= 0: OpenMP's default).
int run_call(const Args& a, int32_t num_threads, int64_t split_keys) {
  const int nt = resolve_threads(num_threads);
  try {  // allocation failures outside the parallel region surface as -4, never as a crash
    if (a.flags & 1) return run_all<0>(a, nt, split_keys);
    switch (a.D) {
      case 32: return run_all<32>(a, nt, split_keys);
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

}  // namespace

extern "C" {

// Returns 0 on success; negative on bad arguments (-1 sizes, -2 slot, -3 ctx, -6 token offset),
// allocation failure (-4) or a requested path this machine lacks (-5). Nothing is written on a bad
// argument. kv_dtype: 0 fp32, 1 bf16, 2 fp16. num_threads <= 0: OpenMP default; at most that many, and
// the calling thread alone for a small call under OMP_WAIT_POLICY=PASSIVE (small_call). chunk_keys <= 0:
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
  if (int rc = check_sizes(q_dtype, kv_dtype, out_dtype, q_tok, out_tok, B, Hq, Hkv, D, R, S, flags)) return rc;
  if (N < 1) return -1;
  if (B == 0) return 0;
  if (!q || !k_cache || !v_cache || !slots || !ctx_lens || !out) return -1;
  for (int64_t b = 0; b < B; ++b)
    if (int rc = check_row(slots[b], ctx_lens[b], tokens ? tokens[b] : b * N, N, R, S, T)) return rc;
  const Args a = make_args(q, q_dtype, q_tok, k_cache, v_cache, kv_dtype, slots, ctx_lens, tokens, out, out_dtype,
                           out_tok, B, N, Hq, Hkv, D, R, S, scale, chunk_keys, flags);
  return run_call(a, num_threads, split_keys);
}

// As specmoe_verify_attention_tokens with counts[b] (>= 1) query tokens for batch row b, from row
// tokens[b] (required). The rows are run grouped by count, largest count first.
int specmoe_verify_attention_ragged(const void* q, int32_t q_dtype, int64_t q_tok, const void* k_cache,
                                    const void* v_cache, int32_t kv_dtype, const int64_t* slots,
                                    const int64_t* ctx_lens, const int64_t* tokens, const int64_t* counts,
                                    int64_t T, void* out, int32_t out_dtype, int64_t out_tok, int64_t B, int64_t Hq,
                                    int64_t Hkv, int64_t D, int64_t R, int64_t S, float scale, int32_t num_threads,
                                    int64_t chunk_keys, int64_t split_keys, int32_t flags) {
  if (int rc = check_sizes(q_dtype, kv_dtype, out_dtype, q_tok, out_tok, B, Hq, Hkv, D, R, S, flags)) return rc;
  if (B == 0) return 0;
  if (!q || !k_cache || !v_cache || !slots || !ctx_lens || !tokens || !counts || !out) return -1;
  for (int64_t b = 0; b < B; ++b) {
    if (counts[b] < 1) return -1;
    if (int rc = check_row(slots[b], ctx_lens[b], tokens[b], counts[b], R, S, T)) return rc;
  }
  std::vector<int64_t> order(B);  // batch rows by count, largest first (stable: pass order inside a count)
  for (int64_t b = 0; b < B; ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return counts[x] > counts[y]; });
  std::vector<int64_t> rs(B), rl(B), rt(B);  // slots, cached lengths and first token rows in that order
  for (int64_t i = 0; i < B; ++i) rs[i] = slots[order[i]], rl[i] = ctx_lens[order[i]], rt[i] = tokens[order[i]];
  std::vector<Args> groups;  // each a run of one count in that order
  double total = 0.0, largest = 0.0;
  for (int64_t i = 0; i < B;) {
    const int64_t N = counts[order[i]], i0 = i;
    while (i < B && counts[order[i]] == N) ++i;
    groups.push_back(make_args(q, q_dtype, q_tok, k_cache, v_cache, kv_dtype, &rs[i0], &rl[i0], &rt[i0], out,
                               out_dtype, out_tok, i - i0, N, Hq, Hkv, D, R, S, scale, chunk_keys, flags));
    const double w = call_row_keys(groups.back());  // the group's arithmetic, to balance the groups
    total += w, largest = std::max(largest, w);
  }
  const int nt = resolve_threads(num_threads), G = int(groups.size());
  if (nt > 1 && G > 1 && largest * nt <= total) {  // side by side, one thread each, largest first
    int rc = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(std::min(nt, G)) reduction(min : rc)
    for (int i = 0; i < G; ++i) rc = std::min(rc, run_call(groups[i], 1, split_keys));
    return rc;
  }
  for (const Args& a : groups)
    if (int rc = run_call(a, num_threads, split_keys)) return rc;
  return 0;
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
  int n = std::snprintf(buf, sizeof buf, "isa=%s width=%d openmp=%d max_threads=%d paths=%s%sfp32", VA_ISA, W, omp,
                        mt, (p >> PATH_AMX) & 1 ? "amx," : "", (p >> PATH_DPBF) & 1 ? "avx512bf16," : "");
#ifdef VA_CHECK_UNITS
  std::snprintf(buf + n, sizeof buf - n, " units=%lld/%lld/%lld", (long long)g_unit_chunks, (long long)g_unit_off,
                (long long)g_unit_worst_pct);
#endif
  (void)n;
  return buf;
}

}  // extern "C"
