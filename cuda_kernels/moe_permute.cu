// Token-to-expert permutation (a stable counting sort), the token gather and the
// routing-weighted combine.
//
// Dimensions: T tokens, K experts per token, N = T*K flat assignments (flat index i = t*K + k),
// E experts, C = ceil(N / PERM_CHUNK) chunks, H hidden.
//
// Sort in three launches, all deterministic (no atomics on the output order):
//   perm_count_*  one warp per chunk: per-chunk expert histogram  chunk_tab[C, E]
//   perm_scan     one block: chunk_tab -> exclusive per-expert prefix over chunks (in place),
//                 counts[E], offsets[E+1] (exclusive scan of counts)
//   perm_scatter_* one warp per chunk, walking its chunk in order: an element's position is
//                 offsets[e] + (earlier chunks' count of e) + (rank of e earlier in this chunk),
//                 so the order inside an expert is the flat (token, slot) order: stable.
// Ids outside [0, E) set their chunk's flag chunk_err[c] and are left out (inv = -1 there);
// nothing is read or written out of bounds.
#include "common.cu"

#define PERM_CHUNK 512

template <typename I>
__device__ __forceinline__ int load_expert(const I* ids, long long i, long long end, int E, bool* bad) {
  if (i >= end) return -1;
  const long long v = (long long)ids[i];
  if (v < 0 || v >= E) {
    *bad = true;
    return -1;
  }
  return (int)v;
}

// chunk_err[c] = 1 when chunk c holds an id outside [0, E), else 0 (every chunk writes its flag).
template <typename I>
__device__ void perm_count_impl(const I* ids, long long n, int E, int* chunk_tab, int* chunk_err) {
  const int lane = threadIdx.x;
  int* row = chunk_tab + (long long)blockIdx.x * E;
  for (int e = lane; e < E; e += 32) row[e] = 0;
  __syncwarp();
  const long long start = (long long)blockIdx.x * PERM_CHUNK;
  const long long end = min(n, start + PERM_CHUNK);
  bool bad = false;
  for (long long base = start; base < end; base += 32) {
    const int e = load_expert(ids, base + lane, end, E, &bad);
    const unsigned int same = __match_any_sync(SPECMOE_FULL_MASK, e);
    if (e >= 0 && lane == __ffs(same) - 1) row[e] += __popc(same);
    __syncwarp();
  }
  const bool any_bad = __any_sync(SPECMOE_FULL_MASK, bad);
  if (lane == 0) chunk_err[blockIdx.x] = any_bad ? 1 : 0;
}

extern "C" __global__ void perm_count_i32(const int* ids, long long n, int E, int* chunk_tab, int* chunk_err) {
  perm_count_impl(ids, n, E, chunk_tab, chunk_err);
}
extern "C" __global__ void perm_count_i64(const long long* ids, long long n, int E, int* chunk_tab,
                                          int* chunk_err) {
  perm_count_impl(ids, n, E, chunk_tab, chunk_err);
}

// One block of PERM_SCAN_THREADS threads (a multiple of 32, at most 1024).
#define PERM_SCAN_THREADS 1024
extern "C" __global__ void perm_scan(int* chunk_tab, int n_chunks, int E, long long* counts,
                                     long long* offsets) {
  __shared__ long long warp_excl[32];
  __shared__ long long round_total;
  __shared__ long long carry;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n_warps = blockDim.x >> 5;
  if (tid == 0) carry = 0;
  __syncthreads();
  for (int e0 = 0; e0 < E; e0 += blockDim.x) {
    const int e = e0 + tid;
    long long total = 0;
    if (e < E) {
      for (int c = 0; c < n_chunks; ++c) {
        int* p = chunk_tab + (long long)c * E + e;
        const int v = *p;
        *p = (int)total;
        total += v;
      }
      counts[e] = total;
    }
    long long x = total;  // inclusive scan inside the warp
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const long long y = __shfl_up_sync(SPECMOE_FULL_MASK, x, o);
      if (lane >= o) x += y;
    }
    if (lane == 31) warp_excl[warp] = x;
    __syncthreads();
    if (warp == 0) {
      const long long w = (lane < n_warps) ? warp_excl[lane] : 0;
      long long s = w;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const long long y = __shfl_up_sync(SPECMOE_FULL_MASK, s, o);
        if (lane >= o) s += y;
      }
      if (lane < n_warps) warp_excl[lane] = s - w;
      if (lane == 31) round_total = s;
    }
    __syncthreads();
    if (e < E) offsets[e] = carry + warp_excl[warp] + (x - total);
    __syncthreads();
    if (tid == 0) carry += round_total;
    __syncthreads();
  }
  if (tid == 0) offsets[E] = carry;
}

template <typename I>
__device__ void perm_scatter_impl(const I* ids, long long n, int E, int* chunk_tab, const long long* offsets,
                                  long long* perm, long long* inv) {
  const int lane = threadIdx.x;
  int* row = chunk_tab + (long long)blockIdx.x * E;  // running count of e before this point
  const unsigned int lanes_below = (1u << lane) - 1u;
  const long long start = (long long)blockIdx.x * PERM_CHUNK;
  const long long end = min(n, start + PERM_CHUNK);
  for (long long base = start; base < end; base += 32) {
    const long long i = base + lane;
    bool bad = false;  // already flagged by perm_count
    const int e = load_expert(ids, i, end, E, &bad);
    const unsigned int same = __match_any_sync(SPECMOE_FULL_MASK, e);
    const int leader = __ffs(same) - 1;
    int before = 0;
    if (e >= 0 && lane == leader) {
      before = row[e];
      row[e] = before + __popc(same);
    }
    before = __shfl_sync(SPECMOE_FULL_MASK, before, leader);
    __syncwarp();
    if (i < end) {
      if (e >= 0) {
        const long long pos = offsets[e] + before + __popc(same & lanes_below);
        perm[pos] = i;
        inv[i] = pos;
      } else {
        inv[i] = -1;
      }
    }
  }
}

extern "C" __global__ void perm_scatter_i32(const int* ids, long long n, int E, int* chunk_tab,
                                            const long long* offsets, long long* perm, long long* inv) {
  perm_scatter_impl(ids, n, E, chunk_tab, offsets, perm, inv);
}
extern "C" __global__ void perm_scatter_i64(const long long* ids, long long n, int E, int* chunk_tab,
                                            const long long* offsets, long long* perm, long long* inv) {
  perm_scatter_impl(ids, n, E, chunk_tab, offsets, perm, inv);
}

// xs[p, :] = x[perm[p] / K, :], rows copied as raw words of type U (uint4 / uint / ushort),
// row_units words per row. A perm entry out of range gives a zero row. Grid: one block per
// output row (gridDim.x = N).
template <typename U>
__device__ __forceinline__ void gather_rows_impl(const U* src, U* dst, const long long* perm, int K,
                                                 long long n_src_rows, long long n_perm, int row_units, U zero) {
  const long long r = blockIdx.x;
  const long long flat = perm[r];
  const long long s = flat / K;
  const bool ok = flat >= 0 && flat < n_perm && s < n_src_rows;
  const U* sp = src + (ok ? s : 0) * (long long)row_units;
  U* dp = dst + r * (long long)row_units;
  for (int j = threadIdx.x; j < row_units; j += blockDim.x) dp[j] = ok ? sp[j] : zero;
}

extern "C" __global__ void gather_rows_u128(const uint4* src, uint4* dst, const long long* perm, int K,
                                            long long n_src_rows, long long n_perm, int row_units) {
  gather_rows_impl(src, dst, perm, K, n_src_rows, n_perm, row_units, make_uint4(0u, 0u, 0u, 0u));
}
extern "C" __global__ void gather_rows_u32(const unsigned int* src, unsigned int* dst, const long long* perm, int K,
                                           long long n_src_rows, long long n_perm, int row_units) {
  gather_rows_impl(src, dst, perm, K, n_src_rows, n_perm, row_units, 0u);
}
extern "C" __global__ void gather_rows_u16(const unsigned short* src, unsigned short* dst, const long long* perm,
                                           int K, long long n_src_rows, long long n_perm, int row_units) {
  gather_rows_impl(src, dst, perm, K, n_src_rows, n_perm, row_units, (unsigned short)0);
}

#define COMBINE_KU 4  // expert slots loaded together

// y[t, :] = sum_k w[t, k] * ys[inv[t*K + k], :], fp32 accumulation (in k order). Grid: one block per token.
// V elements per thread per step (H % V == 0 and 16/8/4-byte aligned rows, checked by the host).
// An inv entry out of range contributes nothing.
template <typename Tin, typename Tout, int V>
__device__ __forceinline__ void combine_impl(const Tin* ys, const long long* inv, const float* w, Tout* y,
                                             int K, int H, long long n_ys_rows) {
  const long long t = blockIdx.x;
  const long long* inv_t = inv + t * K;
  const float* w_t = w + t * K;
  for (int h = threadIdx.x * V; h < H; h += blockDim.x * V) {
    float acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = 0.f;
    for (int k0 = 0; k0 < K; k0 += COMBINE_KU) {
      float x[COMBINE_KU][V];  // COMBINE_KU expert rows in flight before the FMAs
      float wk[COMBINE_KU];
#pragma unroll
      for (int j = 0; j < COMBINE_KU; ++j) {
        const int k = k0 + j;
        const long long r = k < K ? inv_t[k] : -1;
        const bool ok = r >= 0 && r < n_ys_rows;
        wk[j] = ok ? w_t[k] : 0.f;
        if (ok) {
          load_vec<V>(ys + r * (long long)H + h, x[j]);
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) x[j][v] = 0.f;
        }
      }
#pragma unroll
      for (int j = 0; j < COMBINE_KU; ++j)
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] = fmaf(wk[j], x[j][v], acc[v]);
    }
    store_vec<V>(y + t * (long long)H + h, acc);
  }
}

#define SPECMOE_COMBINE(NAME, TIN, TOUT, V)                                                        \
  extern "C" __global__ void NAME(const TIN* ys, const long long* inv, const float* w, TOUT* y, int K, \
                                  int H, long long n_ys_rows) {                                    \
    combine_impl<TIN, TOUT, V>(ys, inv, w, y, K, H, n_ys_rows);                                    \
  }
SPECMOE_COMBINE(combine_bf16_bf16_v8, bf16_t, bf16_t, 8)
SPECMOE_COMBINE(combine_bf16_bf16_v1, bf16_t, bf16_t, 1)
SPECMOE_COMBINE(combine_bf16_f32_v8, bf16_t, float, 8)
SPECMOE_COMBINE(combine_bf16_f32_v1, bf16_t, float, 1)
SPECMOE_COMBINE(combine_f32_f32_v4, float, float, 4)
SPECMOE_COMBINE(combine_f32_f32_v1, float, float, 1)
SPECMOE_COMBINE(combine_f32_bf16_v4, float, bf16_t, 4)
SPECMOE_COMBINE(combine_f32_bf16_v1, float, bf16_t, 1)
