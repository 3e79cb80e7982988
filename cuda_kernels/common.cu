// Shared device helpers for the specmoe kernels: bf16 <-> fp32 conversion and vector loads.
//
// This file defines no kernels. The other kernel files `#include "common.cu"`; at run time
// cuda_kernels.load_source() splices it in textually (so CuPy's cache key covers it), and
// nvcc / NVRTC builds find it through -I<cuda_kernels dir>. No host headers are used, so the
// sources compile under NVRTC as they are.
//
// bf16 values travel as raw `unsigned short` bit patterns: NVRTC needs no cuda_bf16.h then.
#ifndef SPECMOE_COMMON_CU
#define SPECMOE_COMMON_CU

typedef unsigned short bf16_t;

#define SPECMOE_FULL_MASK 0xffffffffu
#define SPECMOE_NEG_INF (__int_as_float(0xff800000))
#define SPECMOE_NAN (__int_as_float(0x7fc00000))

__device__ __forceinline__ float bf16_to_f32(bf16_t h) {
  return __uint_as_float(((unsigned int)h) << 16);
}

// Round to nearest even, NaN kept quiet: the same rounding as torch's float -> bfloat16.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16_t x) { return bf16_to_f32(x); }
__device__ __forceinline__ void from_f32(float v, float* dst) { *dst = v; }
__device__ __forceinline__ void from_f32(float v, bf16_t* dst) { *dst = f32_to_bf16(v); }

// Load V consecutive elements starting at p (aligned to V * sizeof(T)) as fp32.
// V * sizeof(T) is 16, 8, 4 or 2 (bf16) / 16, 8, 4 (fp32): one vector instruction.
template <int V>
__device__ __forceinline__ void load_vec(const float* p, float* out) {
  if constexpr (V == 4) {
    float4 r = *reinterpret_cast<const float4*>(p);
    out[0] = r.x; out[1] = r.y; out[2] = r.z; out[3] = r.w;
  } else if constexpr (V == 2) {
    float2 r = *reinterpret_cast<const float2*>(p);
    out[0] = r.x; out[1] = r.y;
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = p[i];
  }
}

__device__ __forceinline__ void unpack_bf16x2(unsigned int w, float* out) {
  out[0] = __uint_as_float(w << 16);
  out[1] = __uint_as_float(w & 0xffff0000u);
}

__device__ __forceinline__ unsigned int pack_bf16x2(float a, float b) {
  return ((unsigned int)f32_to_bf16(a)) | (((unsigned int)f32_to_bf16(b)) << 16);
}

template <int V>
__device__ __forceinline__ void load_vec(const bf16_t* p, float* out) {
  if constexpr (V == 8) {
    uint4 r = *reinterpret_cast<const uint4*>(p);
    unpack_bf16x2(r.x, out); unpack_bf16x2(r.y, out + 2);
    unpack_bf16x2(r.z, out + 4); unpack_bf16x2(r.w, out + 6);
  } else if constexpr (V == 4) {
    uint2 r = *reinterpret_cast<const uint2*>(p);
    unpack_bf16x2(r.x, out); unpack_bf16x2(r.y, out + 2);
  } else if constexpr (V == 2) {
    unpack_bf16x2(*reinterpret_cast<const unsigned int*>(p), out);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = bf16_to_f32(p[i]);
  }
}

template <int V>
__device__ __forceinline__ void store_vec(float* p, const float* in) {
  if constexpr (V == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
  } else if constexpr (V == 2) {
    *reinterpret_cast<float2*>(p) = make_float2(in[0], in[1]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = in[i];
  }
}

template <int V>
__device__ __forceinline__ void store_vec(bf16_t* p, const float* in) {
  if constexpr (V == 8) {
    *reinterpret_cast<uint4*>(p) = make_uint4(pack_bf16x2(in[0], in[1]), pack_bf16x2(in[2], in[3]),
                                              pack_bf16x2(in[4], in[5]), pack_bf16x2(in[6], in[7]));
  } else if constexpr (V == 4) {
    *reinterpret_cast<uint2*>(p) = make_uint2(pack_bf16x2(in[0], in[1]), pack_bf16x2(in[2], in[3]));
  } else if constexpr (V == 2) {
    *reinterpret_cast<unsigned int*>(p) = pack_bf16x2(in[0], in[1]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = f32_to_bf16(in[i]);
  }
}

#endif  // SPECMOE_COMMON_CU
