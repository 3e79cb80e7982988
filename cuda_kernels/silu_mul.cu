// Fused SiLU-mul of a gated MLP: out[m, f] = silu(gate[m, f]) * up[m, f], computed in fp32 and
// rounded once to the output dtype.
//
// Dimensions: M rows (tokens), F intermediate size. gate and up are row-strided views, so one
// kernel serves both forms: the fused gate_up [M, 2F] (gate = gate_up, up = gate_up + F, both with
// row stride 2F) and two separate [M, F] tensors (row stride F). out is contiguous [M, F].
// Grid: one block per row; V elements per thread per step (F % V == 0 and aligned rows, checked by
// the host; V = 1 is the unaligned fallback).
#include "common.cu"

template <typename T, int V>
__device__ __forceinline__ void silu_mul_impl(const T* gate, long long gate_stride, const T* up, long long up_stride,
                                              T* out, int F) {
  const long long m = blockIdx.x;
  const T* g = gate + m * gate_stride;
  const T* u = up + m * up_stride;
  T* o = out + m * (long long)F;
  for (int f = threadIdx.x * V; f < F; f += blockDim.x * V) {
    float gv[V], uv[V], ov[V];
    load_vec<V>(g + f, gv);
    load_vec<V>(u + f, uv);
#pragma unroll
    for (int v = 0; v < V; ++v) ov[v] = gv[v] / (1.0f + expf(-gv[v])) * uv[v];
    store_vec<V>(o + f, ov);
  }
}

#define SPECMOE_SILU_MUL(NAME, T, V)                                                                   \
  extern "C" __global__ void NAME(const T* gate, long long gate_stride, const T* up, long long up_stride, \
                                  T* out, int F) {                                                     \
    silu_mul_impl<T, V>(gate, gate_stride, up, up_stride, out, F);                                     \
  }
SPECMOE_SILU_MUL(silu_mul_bf16_v8, bf16_t, 8)
SPECMOE_SILU_MUL(silu_mul_bf16_v2, bf16_t, 2)
SPECMOE_SILU_MUL(silu_mul_bf16_v1, bf16_t, 1)
SPECMOE_SILU_MUL(silu_mul_f32_v4, float, 4)
SPECMOE_SILU_MUL(silu_mul_f32_v1, float, 1)
