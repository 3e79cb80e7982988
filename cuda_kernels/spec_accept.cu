// Draft-acceptance check of speculative decoding.
//
// Dimensions: B sequences, k draft tokens per sequence, V vocabulary.
//
// greedy_accept: accepted_len[b] = number of leading j with draft[b, j] == target_argmax[b, j];
//   next_token[b] = target_argmax[b, accepted_len[b]] (the correction, or the bonus token when all k
//   were accepted). One thread per sequence.
//
// rejection_sample_accept (Leviathan et al. 2023): token j is accepted when u_accept[b, j] * q < p
//   (q, p the draft's and the target's probability of draft[b, j]; i.e. with probability
//   min(1, p / q)); at the first rejection n the next token is drawn from norm(max(0, p[n] - q[n])),
//   and if all k were accepted, from p[k]. The draw is the inverse CDF at u_sample[b] * total.
//   One block per sequence; the CDF is a block-wide scan over V in fp64.
#include "common.cu"

extern "C" __global__ void greedy_accept(const long long* draft, const long long* target, int B, int k,
                                         long long* accepted_len, long long* next_token) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const long long* d = draft + (long long)b * k;
  const long long* t = target + (long long)b * (k + 1);
  int j = 0;
  while (j < k && d[j] == t[j]) ++j;
  accepted_len[b] = j;
  next_token[b] = t[j];
}

#define RS_THREADS 512

// p_row, q_row: the distributions the next token is drawn from (q_row == nullptr: draw from p_row).
// Returns the first index whose running mass exceeds u * total (never a zero-mass index).
template <typename P>
__device__ long long residual_draw(const P* p_row, const P* q_row, long long V, float u, double* sh) {
  __shared__ long long found, last_pos;
  const int tid = threadIdx.x;
  const long long per = (V + RS_THREADS - 1) / RS_THREADS;
  const long long lo = min(V, tid * per), hi = min(V, lo + per);
  if (tid == 0) {
    found = V;
    last_pos = -1;
  }
  // pass 1: this thread's share of the residual mass (and of p, the fallback when it is all zero)
  double part = 0.0, part_p = 0.0;
  long long my_last = -1, my_last_p = -1;
  for (long long v = lo; v < hi; ++v) {
    const float pv = to_f32(p_row[v]);
    const float qv = q_row ? to_f32(q_row[v]) : 0.0f;
    const float r = fmaxf(pv - qv, 0.0f);
    part += (double)r;
    part_p += (double)pv;
    if (r > 0.0f) my_last = v;
    if (pv > 0.0f) my_last_p = v;
  }
  // block inclusive scans (Hillis-Steele) of both, in sh[0:RS_THREADS] and sh[RS_THREADS:2*RS_THREADS]
  double* a = sh;
  double* b = sh + RS_THREADS;
  a[tid] = part;
  b[tid] = part_p;
  __syncthreads();
  for (int o = 1; o < RS_THREADS; o <<= 1) {
    const double xa = tid >= o ? a[tid - o] : 0.0;
    const double xb = tid >= o ? b[tid - o] : 0.0;
    __syncthreads();
    a[tid] += xa;
    b[tid] += xb;
    __syncthreads();
  }
  const bool use_res = a[RS_THREADS - 1] > 0.0;
  const double* scan = use_res ? a : b;
  const double total = scan[RS_THREADS - 1];
  const double thr = (double)u * total;
  const long long mine_last = use_res ? my_last : my_last_p;
  if (mine_last >= 0) atomicMax(&last_pos, mine_last);
  // the thread whose [exclusive, inclusive) prefix range holds thr walks its share again
  const double before = tid > 0 ? scan[tid - 1] : 0.0;
  if (hi > lo && before <= thr && thr < scan[tid]) {
    double c = before;
    long long hit = -1, last = -1;
    for (long long v = lo; v < hi; ++v) {
      const float pv = to_f32(p_row[v]);
      const float qv = (use_res && q_row) ? to_f32(q_row[v]) : 0.0f;
      const float r = fmaxf(pv - qv, 0.0f);
      if (r <= 0.0f) continue;
      last = v;
      c += (double)r;
      if (c > thr) {
        hit = v;
        break;
      }
    }
    if (hit < 0) hit = last;  // rounding: the running sum fell just short of thr
    if (hit >= 0) atomicMin(&found, hit);
  }
  __syncthreads();
  long long tok = found;
  if (tok >= V) tok = last_pos;  // thr >= total (u just under 1, rounded up)
  if (tok < 0) tok = V - 1;      // no mass at all (an all-zero row)
  return tok;
}

template <typename P>
__device__ void rejection_impl(const long long* draft, const P* q, const P* p, const float* u_accept,
                               const float* u_sample, int k, long long V, long long* accepted_len,
                               long long* next_token) {
  __shared__ double sh[2 * RS_THREADS];
  __shared__ int n_acc;
  const long long b = blockIdx.x;
  if (threadIdx.x == 0) {
    int j = 0;
    for (; j < k; ++j) {
      const long long x = draft[b * k + j];
      if (x < 0 || x >= V) break;  // an impossible draft token is rejected
      const float qx = to_f32(q[(b * k + j) * V + x]);
      const float px = to_f32(p[(b * (k + 1) + j) * V + x]);
      if (!(u_accept[b * k + j] * qx < px)) break;
    }
    n_acc = j;
  }
  __syncthreads();
  const int n = n_acc;
  const P* p_row = p + (b * (k + 1) + n) * V;
  const P* q_row = n < k ? q + (b * k + n) * V : nullptr;
  const long long tok = residual_draw(p_row, q_row, V, u_sample[b], sh);
  if (threadIdx.x == 0) {
    accepted_len[b] = n;
    next_token[b] = tok;
  }
}

extern "C" __global__ void rejection_accept_f32(const long long* draft, const float* q, const float* p,
                                                const float* u_accept, const float* u_sample, int k, long long V,
                                                long long* accepted_len, long long* next_token) {
  rejection_impl(draft, q, p, u_accept, u_sample, k, V, accepted_len, next_token);
}
