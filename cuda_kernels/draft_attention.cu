// Decode attention for the draft's GPU part: one new query per sequence against its cached keys.
//
// Dimensions: B sequences, Hq query heads, Hkv KV heads, G = Hq / Hkv (GQA group), D head dim,
// R cache rows, S cache capacity, P splits of the key range (split-K).
//   q       [B, Hq, D] fp32 (pre-scaling is done here: scores use `scale`)
//   k, v    [R, Hkv, S, D] bf16 or fp32, any strides for R, Hkv, S; unit stride over D
//   slots   [B] int64 cache row of each sequence;  lens [B] int64 valid keys (the new one included)
//   out     [B, Hq, D] fp32
// Fast kernels dda_<kv>_d<D>_g<G>: one block per (sequence, KV head, split), 4 warps. A group of
// LPK lanes holds one key row (VEC elements per lane and vector, NV vectors), so each K/V row is read
// once for the whole query group; each lane group runs its own online softmax over UNROLL keys at a
// time (loads for all of them in flight first), and the block merges its streams in shared memory.
// With P > 1 the block writes an unnormalised partial (o, m, l) and dda_combine merges the splits.
// dda_generic_<kv>: any D <= 512 and any G, one block per (sequence, query head), no split.
// Bad rows (slot outside [0, R), len outside [1, S]) give NaN outputs and read nothing.
#include "common.cu"

#define DDA_WARPS 4
#define DDA_THREADS (DDA_WARPS * 32)
#define DDA_UNROLL 4  // keys per lane group per step (2 for G = 8)
#define DDA_LOG2E 1.4426950408889634f

// 16 bytes of KV: 8 bf16 or 4 fp32 values, as fp32.
__device__ __forceinline__ void unpack16(const uint4& r, float* out, const bf16_t*) {
  unpack_bf16x2(r.x, out); unpack_bf16x2(r.y, out + 2); unpack_bf16x2(r.z, out + 4); unpack_bf16x2(r.w, out + 6);
}
__device__ __forceinline__ void unpack16(const uint4& r, float* out, const float*) {
  out[0] = __uint_as_float(r.x); out[1] = __uint_as_float(r.y);
  out[2] = __uint_as_float(r.z); out[3] = __uint_as_float(r.w);
}

__device__ __forceinline__ bool dda_bad_row(long long slot, long long len, long long R, long long S) {
  return slot < 0 || slot >= R || len < 1 || len > S;
}

// One step of a lane group's keys: U keys (base + sub + u*STEP) loaded for all of them first, their
// scores against the G query rows, and the online softmax of each row taking them in.
template <typename KV, int VEC, int LPK, int NV, int G, int U>
__device__ __forceinline__ void dda_keys(const KV* kb, const KV* vb, long long k_ss,
                                         long long v_ss, long long base, long long k_beg, long long k_end, int sub,
                                         int sl, const float (&qr)[G][VEC * NV], float (&m)[G], float (&l)[G],
                                         float (&acc)[G][VEC * NV]) {
  constexpr int EPL = VEC * NV;
  constexpr int STEP = DDA_WARPS * (32 / LPK);  // keys per block step
  uint4 kraw[U][NV], vraw[U][NV];  // 16-byte vectors, unpacked on use (fewer live registers)
  bool valid[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const long long key = base + sub + (long long)u * STEP;
    valid[u] = key < k_end;
    const long long kk = valid[u] ? key : k_beg;  // an in-bounds row; its result is masked
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      kraw[u][j] = *reinterpret_cast<const uint4*>(kb + kk * k_ss + (j * LPK + sl) * VEC);
      vraw[u][j] = *reinterpret_cast<const uint4*>(vb + kk * v_ss + (j * LPK + sl) * VEC);
    }
  }
  float s[U][G];
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float d = 0.f;
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        float kf[VEC];
        unpack16(kraw[u][j], kf, kb);
#pragma unroll
        for (int e = 0; e < VEC; ++e) d = fmaf(qr[g][j * VEC + e], kf[e], d);
      }
#pragma unroll
      for (int o = LPK / 2; o > 0; o >>= 1) d += __shfl_xor_sync(SPECMOE_FULL_MASK, d, o);
      s[u][g] = valid[u] ? d : SPECMOE_NEG_INF;
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float mx = m[g];
#pragma unroll
    for (int u = 0; u < U; ++u) mx = fmaxf(mx, s[u][g]);
    const float mref = (mx == SPECMOE_NEG_INF) ? 0.f : mx;
    const float corr = exp2f(m[g] - mref);
    l[g] *= corr;
#pragma unroll
    for (int i = 0; i < EPL; ++i) acc[g][i] *= corr;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const float p = exp2f(s[u][g] - mref);
      l[g] += p;
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        float vf[VEC];
        unpack16(vraw[u][j], vf, vb);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[g][j * VEC + e] = fmaf(p, vf[e], acc[g][j * VEC + e]);
      }
    }
    m[g] = mx;
  }
}

// Merges the block's STREAMS online-softmax states (m, l, acc of each lane group) through shared memory
// into the output rows of (b, h) or, with splits, into this split's unnormalised partial.
template <int VEC, int LPK, int NV, int G, int STREAMS>
__device__ __forceinline__ void dda_merge(float* sm_acc, float* sm_m, float* sm_l, int stream, int sl, int tid,
                                          const float (&m)[G], const float (&l)[G], const float (&acc)[G][VEC * NV],
                                          long long b, int h, int Hq, int split, int n_split, float* __restrict__ out,
                                          float* __restrict__ part_o, float* __restrict__ part_ml) {
  constexpr int D = LPK * VEC * NV;
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int j = 0; j < NV; ++j)
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        sm_acc[(stream * G + g) * D + (j * LPK + sl) * VEC + e] = acc[g][j * VEC + e];
    if (sl == 0) {
      sm_m[stream * G + g] = m[g];
      sm_l[stream * G + g] = l[g];
    }
  }
  __syncthreads();
  for (int i = tid; i < G * D; i += DDA_THREADS) {
    const int g = i / D, d = i % D;
    float M = SPECMOE_NEG_INF;
#pragma unroll
    for (int st = 0; st < STREAMS; ++st) M = fmaxf(M, sm_m[st * G + g]);
    float L = 0.f, O = 0.f;
    if (M != SPECMOE_NEG_INF) {
#pragma unroll
      for (int st = 0; st < STREAMS; ++st) {
        const float w = exp2f(sm_m[st * G + g] - M);
        L = fmaf(sm_l[st * G + g], w, L);
        O = fmaf(sm_acc[(st * G + g) * D + d], w, O);
      }
    }
    const long long row = (long long)b * Hq + h * G + g;
    if (n_split == 1) {
      out[row * D + d] = O / L;
    } else {
      part_o[(row * n_split + split) * D + d] = O;
      if (d == 0) {
        part_ml[(row * n_split + split) * 2 + 0] = M;
        part_ml[(row * n_split + split) * 2 + 1] = L;
      }
    }
  }
}

template <typename KV, int VEC, int LPK, int NV, int G>
__device__ void dda_impl(const float* __restrict__ q, const KV* __restrict__ kc, const KV* __restrict__ vc,
                         const long long* __restrict__ slots, const long long* __restrict__ lens,
                         float* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml,
                         int Hkv, long long R, long long S, long long k_sr, long long k_sh, long long k_ss,
                         long long v_sr, long long v_sh, long long v_ss, float scale, int split_len) {
  constexpr int D = LPK * VEC * NV;
  constexpr int EPL = VEC * NV;       // elements per lane
  constexpr int KPW = 32 / LPK;       // keys per warp step
  constexpr int STREAMS = DDA_WARPS * KPW;
  constexpr int STEP = STREAMS;       // keys per block step
  constexpr int U = (G >= 8) ? 2 : DDA_UNROLL;  // keys per lane group in flight (registers)
  static_assert(VEC * sizeof(KV) == 16, "fast kernels move 16-byte vectors");
  __shared__ float sm_acc[STREAMS * G * D];
  __shared__ float sm_m[STREAMS * G];
  __shared__ float sm_l[STREAMS * G];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int sub = lane / LPK, sl = lane % LPK;
  const int stream = warp * KPW + sub;
  const int b = blockIdx.x / Hkv, h = blockIdx.x % Hkv;
  const int split = blockIdx.y, n_split = gridDim.y;
  const int Hq = Hkv * G;
  const long long slot = slots[b], len = lens[b];
  if (dda_bad_row(slot, len, R, S)) {
    for (int i = tid; i < G * D; i += DDA_THREADS) {
      const long long row = (long long)b * Hq + h * G + i / D;
      if (n_split == 1) out[row * D + i % D] = SPECMOE_NAN;
      else part_o[(row * n_split + split) * D + i % D] = SPECMOE_NAN;
    }
    return;  // dda_combine checks the row again
  }
  const long long k_beg = (long long)split * split_len;
  const long long k_end = min(len, k_beg + split_len);
  const KV* kb = kc + slot * k_sr + h * k_sh;
  const KV* vb = vc + slot * v_sr + h * v_sh;

  // this lane's elements: d = (j * LPK + sl) * VEC + e, j < NV, e < VEC
  const float qscale = scale * DDA_LOG2E;
  float qr[G][EPL];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const float* qg = q + ((long long)b * Hq + h * G + g) * D;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      float tmp[VEC];
      load_vec<VEC>(qg + (j * LPK + sl) * VEC, tmp);
#pragma unroll
      for (int e = 0; e < VEC; ++e) qr[g][j * VEC + e] = tmp[e] * qscale;
    }
  }
  float m[G], l[G], acc[G][EPL];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = SPECMOE_NEG_INF;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) acc[g][i] = 0.f;
  }

  // warp-uniform loop (all lanes run the same trip count: the shuffles below need the full warp)
  for (long long base = k_beg + warp * KPW; base < k_end; base += (long long)STEP * U)
    dda_keys<KV, VEC, LPK, NV, G, U>(kb, vb, k_ss, v_ss, base, k_beg, k_end, sub, sl, qr, m, l, acc);

  dda_merge<VEC, LPK, NV, G, STREAMS>(sm_acc, sm_m, sm_l, stream, sl, tid, m, l, acc, b, h, Hq, split, n_split, out,
                                      part_o, part_ml);
}

// Merge the P split partials: grid B * Hq blocks, threads over D.
extern "C" __global__ void dda_combine(const float* part_o, const float* part_ml, const long long* slots,
                                       const long long* lens, float* out, int Hq, int D, int n_split, long long R,
                                       long long S) {
  const long long row = blockIdx.x;
  const long long b = row / Hq;
  const bool bad = dda_bad_row(slots[b], lens[b], R, S);
  float M = SPECMOE_NEG_INF;
  for (int p = 0; p < n_split; ++p) M = fmaxf(M, part_ml[(row * n_split + p) * 2]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float L = 0.f, O = 0.f;
    for (int p = 0; p < n_split; ++p) {
      const float mp = part_ml[(row * n_split + p) * 2];
      if (mp == SPECMOE_NEG_INF) continue;  // an empty split
      const float w = exp2f(mp - M);
      L = fmaf(part_ml[(row * n_split + p) * 2 + 1], w, L);
      O = fmaf(part_o[(row * n_split + p) * D + d], w, O);
    }
    out[row * D + d] = bad ? SPECMOE_NAN : O / L;
  }
}

#define SPECMOE_DDA(NAME, KV, VEC, LPK, NV, G)                                                            \
  extern "C" __global__ void __launch_bounds__(DDA_THREADS, ((G) >= 8 || (NV) > 1) ? 2 : 4) NAME(                                         \
      const float* q, const KV* kc, const KV* vc, const long long* slots, const long long* lens, float* out,  \
      float* part_o, float* part_ml, int Hkv, long long R, long long S, long long k_sr, long long k_sh,     \
      long long k_ss, long long v_sr, long long v_sh, long long v_ss, float scale, int split_len) {        \
    dda_impl<KV, VEC, LPK, NV, G>(q, kc, vc, slots, lens, out, part_o, part_ml, Hkv, R, S, k_sr, k_sh, k_ss, \
                                  v_sr, v_sh, v_ss, scale, split_len);                                   \
  }
#define SPECMOE_DDA_GROUPS(PREFIX, KV, VEC, LPK, NV) \
  SPECMOE_DDA(PREFIX##_g1, KV, VEC, LPK, NV, 1)      \
  SPECMOE_DDA(PREFIX##_g2, KV, VEC, LPK, NV, 2)      \
  SPECMOE_DDA(PREFIX##_g4, KV, VEC, LPK, NV, 4)      \
  SPECMOE_DDA(PREFIX##_g8, KV, VEC, LPK, NV, 8)
// bf16: 16-byte vectors of 8; fp32: 16-byte vectors of 4.
SPECMOE_DDA_GROUPS(dda_bf16_d64, bf16_t, 8, 8, 1)
SPECMOE_DDA_GROUPS(dda_bf16_d128, bf16_t, 8, 16, 1)
SPECMOE_DDA_GROUPS(dda_bf16_d256, bf16_t, 8, 32, 1)
SPECMOE_DDA_GROUPS(dda_f32_d64, float, 4, 16, 1)
SPECMOE_DDA_GROUPS(dda_f32_d128, float, 4, 32, 1)
SPECMOE_DDA_GROUPS(dda_f32_d256, float, 4, 32, 2)

// Fallback for any head dim D <= DDA_GEN_MAXD and any group: one block per (sequence, query head),
// one key per warp step, lanes stride over D.
#define DDA_GEN_MAXD 512
template <typename KV>
__device__ void dda_generic_impl(const float* q, const KV* kc, const KV* vc, const long long* slots,
                                 const long long* lens, float* out, int Hq, int G, int D, long long R, long long S,
                                 long long k_sr, long long k_sh, long long k_ss, long long v_sr, long long v_sh,
                                 long long v_ss, float scale) {
  constexpr int EPL = DDA_GEN_MAXD / 32;
  __shared__ float sm_acc[DDA_WARPS * DDA_GEN_MAXD];
  __shared__ float sm_m[DDA_WARPS], sm_l[DDA_WARPS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const long long row = blockIdx.x;  // b * Hq + hq
  const long long b = row / Hq;
  const int hq = (int)(row % Hq), h = hq / G;
  const long long slot = slots[b], len = lens[b];
  if (dda_bad_row(slot, len, R, S)) {
    for (int d = tid; d < D; d += DDA_THREADS) out[row * D + d] = SPECMOE_NAN;
    return;
  }
  const KV* kb = kc + slot * k_sr + h * k_sh;
  const KV* vb = vc + slot * v_sr + h * v_sh;
  const float qscale = scale * DDA_LOG2E;
  float qr[EPL], acc[EPL];
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int d = lane + 32 * i;
    qr[i] = d < D ? q[row * D + d] * qscale : 0.f;
    acc[i] = 0.f;
  }
  float m = SPECMOE_NEG_INF, l = 0.f;
  for (long long key = warp; key < len; key += DDA_WARPS) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int d = lane + 32 * i;
      if (d < D) s = fmaf(qr[i], to_f32(kb[key * k_ss + d]), s);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(SPECMOE_FULL_MASK, s, o);
    const float mx = fmaxf(m, s);
    const float corr = exp2f(m - mx), p = exp2f(s - mx);
    l = l * corr + p;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int d = lane + 32 * i;
      if (d < D) acc[i] = fmaf(p, to_f32(vb[key * v_ss + d]), acc[i] * corr);
    }
    m = mx;
  }
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int d = lane + 32 * i;
    if (d < D) sm_acc[warp * DDA_GEN_MAXD + d] = acc[i];
  }
  if (lane == 0) {
    sm_m[warp] = m;
    sm_l[warp] = l;
  }
  __syncthreads();
  float M = SPECMOE_NEG_INF;
  for (int w = 0; w < DDA_WARPS; ++w) M = fmaxf(M, sm_m[w]);
  for (int d = tid; d < D; d += DDA_THREADS) {
    float L = 0.f, O = 0.f;
    for (int w = 0; w < DDA_WARPS; ++w) {
      if (sm_m[w] == SPECMOE_NEG_INF) continue;  // a warp that saw no key (len < DDA_WARPS)
      const float wt = exp2f(sm_m[w] - M);
      L = fmaf(sm_l[w], wt, L);
      O = fmaf(sm_acc[w * DDA_GEN_MAXD + d], wt, O);
    }
    out[row * D + d] = O / L;
  }
}

#define SPECMOE_DDA_GENERIC(NAME, KV)                                                                         \
  extern "C" __global__ void __launch_bounds__(DDA_THREADS)                                                  \
      NAME(const float* q, const KV* kc, const KV* vc, const long long* slots, const long long* lens, float* out, \
           int Hq, int G, int D, long long R, long long S, long long k_sr, long long k_sh, long long k_ss,       \
           long long v_sr, long long v_sh, long long v_ss, float scale) {                                       \
    dda_generic_impl<KV>(q, kc, vc, slots, lens, out, Hq, G, D, R, S, k_sr, k_sh, k_ss, v_sr, v_sh, v_ss, scale); \
  }
SPECMOE_DDA_GENERIC(dda_generic_bf16, bf16_t)
SPECMOE_DDA_GENERIC(dda_generic_f32, float)
