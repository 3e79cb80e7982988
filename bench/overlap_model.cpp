// A model of the CPU verify kernel's memory pattern, to measure how much of a compute phase this
// machine overlaps with streaming the KV from DRAM (bench/overlap_model.py runs it).
//
// Per item: 520 keys of K rows and 520 of V rows, 256 bytes each (one KV head at D = 128, bf16),
// walked in chunks of 192 keys; the chunk two ahead is requested into L2 at an even rate over this
// chunk's work (as the kernel's Prefetch does), and each line pair of the chunk is read and followed by
// amount/4 units of work of one kind (spread evenly: amount 1 is one unit every fourth line pair):
//   kind 0  dependent 512-bit integer multiply-adds (register arithmetic)
//   kind 1  a 16 x 64-byte tile load from an L1-resident scratch buffer and a TDPBF16PS (AMX)
// Items are claimed from a shared counter by every OpenMP thread, as the kernel's are.
// with_memory = 0 runs the same work over the same lines without reading K and V or requesting
// anything (the work alone); with_memory = 1 reads them from wherever they are (the caller evicts
// them first).
#include <immintrin.h>
#include <omp.h>
#ifndef __AVX512F__
#error "the overlap model reads and computes with AVX-512: this CPU (-march=native) has none"
#endif
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>

namespace {

constexpr long KEYS = 520, ROW = 256, CHUNK = 192, AHEAD = 2;
constexpr long SCRATCH = 32 * 1024;  // the AMX work's tile source: stays in L1

double now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
bool amx_ready() {  // Linux asks a process to request the tile data state before its first use
  static thread_local int state = 0;
  if (state == 0) {
    state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
    if (state == 1) {
      TileConfig cfg;
      for (int i = 0; i < 8; ++i) { cfg.colsb[i] = 64; cfg.rows[i] = 16; }
      __asm__ volatile("" : : "r"(&cfg) : "memory");  // GCC -O3 dropped the stores above (ldtilecfg then #UD)
      _tile_loadconfig(&cfg);
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(6);
    }
  }
  return state == 1;
}
#define MODEL_HAS_AMX 1
#else
bool amx_ready() { return false; }
#define MODEL_HAS_AMX 0
#endif

// One chunk: nc keys at k / v, the next lines to request from pf on (pf_lines of them).
__m512i run_chunk(const char* k, const char* v, long vdelta, long nc, const char* pf, long pf_lines, int kind,
                  int amount, int with_memory, const char* scratch, __m512i acc) {
  const long lines = nc * ROW / 64;
  const double rate = double(pf_lines) / double(lines);
  double credit = 0.0;
  long spos = 0;
  __m512i work = _mm512_set1_epi64(3);
  for (long l = 0; l < lines; ++l) {
    if (with_memory) {
      acc = _mm512_xor_si512(acc, _mm512_load_si512(k + l * 64));
      acc = _mm512_xor_si512(acc, _mm512_load_si512(v + l * 64));
    }
    const long units = ((l + 1) * amount) / 4 - (l * amount) / 4;
    for (long w = 0; w < units; ++w) {
      if (kind == 0) {
        work = _mm512_add_epi64(_mm512_mullo_epi64(work, work), acc);
      } else {
#if MODEL_HAS_AMX
        _tile_loadd(4, scratch + spos, 64);
        if (w & 1) _tile_dpbf16ps(1, 4, 6); else _tile_dpbf16ps(0, 4, 6);
        spos = (spos + 1024) % SCRATCH;
#endif
      }
    }
    if (with_memory) {
      for (credit += rate; credit >= 1.0; credit -= 1.0, pf += 64) {
        __builtin_prefetch(pf, 0, 2);
        __builtin_prefetch(pf + vdelta, 0, 2);
      }
    }
  }
  return _mm512_xor_si512(acc, work);
}

}  // namespace

extern "C" {

// 1 when the AMX work (kind 1) can run here.
int overlap_model_has_amx() { return amx_ready() ? 1 : 0; }

// Bytes of K and V the model streams for `items` items.
long overlap_model_bytes(long items) { return 2 * items * KEYS * ROW; }

// Seconds to run `items` items on `threads` threads (k and v: items * KEYS * ROW bytes each);
// negative when the kind cannot run here.
double overlap_model_run(const char* k, const char* v, long items, int kind, int amount, int with_memory, int threads) {
  if (kind == 1 && !amx_ready()) return -1.0;
  long counter = 0;
  volatile long sink = 0;
  const double t0 = now();
#pragma omp parallel num_threads(threads)
  {
    static thread_local char* scratch = nullptr;
    if (!scratch) scratch = static_cast<char*>(std::calloc(SCRATCH + 4096, 1));
    if (kind == 1) amx_ready();
    __m512i acc = _mm512_setzero_si512();
    for (;;) {
      long it;
#pragma omp atomic capture
      it = counter++;
      if (it >= items) break;
      const char* ki = k + it * KEYS * ROW;
      const char* vi = v + it * KEYS * ROW;
      for (long c0 = 0; c0 < KEYS; c0 += CHUNK) {
        const long nc = KEYS - c0 < CHUNK ? KEYS - c0 : CHUNK, p0 = c0 + AHEAD * CHUNK;
        const long pf_keys = p0 < KEYS ? (KEYS - p0 < CHUNK ? KEYS - p0 : CHUNK) : 0;
        acc = run_chunk(ki + c0 * ROW, vi + c0 * ROW, long(reinterpret_cast<intptr_t>(v) - reinterpret_cast<intptr_t>(k)), nc, ki + p0 * ROW, pf_keys * ROW / 64, kind, amount,
                        with_memory, scratch, acc);
      }
    }
    long r[8];
    _mm512_storeu_si512(r, acc);
#pragma omp atomic
    sink += r[0];
  }
  return now() - t0;
}

}  // extern "C"
