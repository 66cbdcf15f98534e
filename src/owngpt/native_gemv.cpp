// owngpt's fp32 matrix-vector product for CPU decoding: y = x W^T + b for a few rows x, W laid out once at load time.
// Built by owngpt/native_kernels.py with the system C++ compiler (no torch headers: one second to compile) and
// called through ctypes; plain C functions, no state.
//
// Why by hand: decoding one token at batch 1 reads every weight once, so its speed is how fast a kernel streams the
// weights from memory. Measured on the 2-core AVX-512 CPU owngpt targets (gpt2 size, the 49 projections of one step
// with nothing around them, bench/bench_decode_step.py, quiet machine): torch's best, oneDNN's inner product on
// weights reordered once, took 13.9 ms on one thread and 11.1 ms on two, while llama.cpp's WHOLE step took 13.2 /
// 10.6 ms; MKL's sgemm/sgemv and numpy's BLAS were 1.5-2.6x slower than oneDNN for one row, and each oneDNN call
// costs 12-20 us before it reads a byte. No decode step built on torch's kernels reaches llama.cpp there. This kernel
// does what llama.cpp's does: one sequential stream of weights, x held in registers, several output rows per pass,
// ~1 us a call. Measured on a shared machine (gpt2 size, medians of the ratio of runs timed next to each other):
// 1.05x oneDNN's speed on one thread and 1.10x on two, the whole decode step 1.14x / 1.06x; 1.4x MKL's on a model
// that fits in the cache (`mini`). At 8 rows it was slower than oneDNN there (0.74-0.86x), which keeps batches on
// AVX-512; on an AVX2 CPU (AMD EPYC, 2 cores) it was 1.24x / 1.33x oneDNN at 8 rows (1 / 2 threads), so there it
// takes a decode step's few rows too (native_kernels.BATCH_ROWS). Tables: docs/benchmarks.md (decode-step and
// decode sections).
//
// Layout (made once by owngpt_pack): the [out, in] weight is cut into blocks of R = 8 output rows; inside a block the
// columns go in chunks of 16 floats, and for each chunk the 8 rows' 16 floats are stored one after another:
//
//     packed[block][chunk][row 0..7][16 floats]        one block = 8 * in_pad floats, contiguous
//
// so a block is read front to back as one stream (what the hardware prefetcher likes best), each 16-float chunk of x
// is loaded once and multiplied into 8 independent accumulators (enough independent FMAs to hide their latency), and
// the 8 sums are reduced once at the end of the block. `in` is padded with zero columns to in_pad (a multiple of 16)
// and `out` with zero rows to a multiple of 8: the weight has no ragged edges. x is not padded: its last, partial
// chunk is read with a masked load (zeros past `in`), and only the `out` real results are written.
//
// Several rows of x (a small batch) reuse each block while it sits in L1/L2, so the weights are still read from
// memory once per call. Threads (OpenMP, torch's thread count passed in) take chunks of blocks as they come free.
//
// Two instruction sets are compiled side by side and chosen at run time from the CPU's flags (owngpt_isa): AVX-512F
// (16 lanes) and AVX2+FMA (the same layout, each chunk as two 8-lane halves). A CPU with neither reports 0 and owngpt
// keeps torch's kernels.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>

namespace {

constexpr int64_t R = 8;       // output rows per block
constexpr int64_t CHUNK = 16;  // columns per chunk

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// One block of 8 weight rows times NX rows of x (x rows `in` floats apart): sums[n * R + r] = dot(W[block row r],
// x[n]). Each weight chunk is loaded once per NX rows: 8 * NX accumulators (24 of AVX-512's 32 registers at NX = 3).
template <int NX>
__attribute__((target("avx512f,fma"))) void block_avx512(const float* w, const float* x, int64_t in, float* sums) {
  __m512 acc[NX][R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 3
    for (int n = 0; n < NX; ++n) acc[n][r] = _mm512_setzero_ps();
  const int64_t full = in / CHUNK * CHUNK;
  for (int64_t c = 0; c < in; c += CHUNK, w += R * CHUNK) {
    __m512 xv[NX];
    if (c < full) {
#pragma GCC unroll 3
      for (int n = 0; n < NX; ++n) xv[n] = _mm512_loadu_ps(x + n * in + c);
    } else {  // the last, partial chunk: lanes past `in` read as 0 (the weight's padding is 0 too)
      const __mmask16 mask = static_cast<__mmask16>((1u << (in - c)) - 1);
#pragma GCC unroll 3
      for (int n = 0; n < NX; ++n) xv[n] = _mm512_maskz_loadu_ps(mask, x + n * in + c);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_load_ps(w + r * CHUNK);
#pragma GCC unroll 3
      for (int n = 0; n < NX; ++n) acc[n][r] = _mm512_fmadd_ps(wv, xv[n], acc[n][r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 3
    for (int n = 0; n < NX; ++n) sums[n * R + r] = _mm512_reduce_add_ps(acc[n][r]);
}

// x rows per pass of the AVX-512 block: 3 (24 accumulators), then 2 or 1 for the rest
constexpr int NX_MAX = 3;

__attribute__((target("avx2,fma"))) float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// lanes [0, n) all ones (load them), the rest zero (read as 0)
__attribute__((target("avx2,fma"))) __m256i mask8(int64_t n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane);
}

// The same block with 8-lane registers: each 16-column chunk as two halves.
__attribute__((target("avx2,fma"))) void block_avx2(const float* w, const float* x, int64_t in, float* sums) {
  __m256 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_ps();
  const int64_t full = in / CHUNK * CHUNK;
  for (int64_t c = 0; c < in; c += CHUNK, w += R * CHUNK) {
    __m256 lo, hi;
    if (c < full) {
      lo = _mm256_loadu_ps(x + c);
      hi = _mm256_loadu_ps(x + c + 8);
    } else {  // the last, partial chunk
      lo = _mm256_maskload_ps(x + c, mask8(in - c));
      hi = _mm256_maskload_ps(x + c + 8, mask8(in - c - 8));
    }
    for (int r = 0; r < R; ++r) {
      a[r] = _mm256_fmadd_ps(_mm256_load_ps(w + r * CHUNK), lo, a[r]);
      a[r] = _mm256_fmadd_ps(_mm256_load_ps(w + r * CHUNK + 8), hi, a[r]);
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = hsum256(a[r]);
}

// The same block over an fp16 copy of the packed weight: half the bytes to stream. Only for the greedy
// head screen (owngpt.greedy_head.GreedyHead), which bounds the rounding and recomputes its candidates in fp32.
__attribute__((target("avx2,fma,f16c"))) void block_avx2_f16(const uint16_t* w, const float* x, int64_t in,
                                                               float* sums) {
  __m256 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_ps();
  const int64_t full = in / CHUNK * CHUNK;
  for (int64_t c = 0; c < in; c += CHUNK, w += R * CHUNK) {
    __m256 lo, hi;
    if (c < full) {
      lo = _mm256_loadu_ps(x + c);
      hi = _mm256_loadu_ps(x + c + 8);
    } else {
      lo = _mm256_maskload_ps(x + c, mask8(in - c));
      hi = _mm256_maskload_ps(x + c + 8, mask8(in - c - 8));
    }
    for (int r = 0; r < R; ++r) {
      const __m256 wl = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(w + r * CHUNK)));
      const __m256 wh = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(w + r * CHUNK + 8)));
      a[r] = _mm256_fmadd_ps(wl, lo, a[r]);
      a[r] = _mm256_fmadd_ps(wh, hi, a[r]);
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = hsum256(a[r]);
}

__attribute__((target("avx512f,fma,f16c"))) void block_avx512_f16(const uint16_t* w, const float* x, int64_t in,
                                                                   float* sums) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const int64_t full = in / CHUNK * CHUNK;
  for (int64_t c = 0; c < in; c += CHUNK, w += R * CHUNK) {
    const __m512 xv = c < full ? _mm512_loadu_ps(x + c)
                               : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (in - c)) - 1), x + c);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(w + r * CHUNK)));
      acc[r] = _mm512_fmadd_ps(wv, xv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
}

// One output row of owngpt_gemv, by the very same arithmetic as its block functions (the same fused multiply-adds
// in the same order per lane, the same horizontal sum): bitwise the value owngpt_gemv writes for that row.
__attribute__((target("avx2,fma"))) float row_avx2(const float* w, const float* x, int64_t in) {
  __m256 a = _mm256_setzero_ps();
  const int64_t full = in / CHUNK * CHUNK;
  for (int64_t c = 0; c < in; c += CHUNK, w += R * CHUNK) {
    __m256 lo, hi;
    if (c < full) {
      lo = _mm256_loadu_ps(x + c);
      hi = _mm256_loadu_ps(x + c + 8);
    } else {
      lo = _mm256_maskload_ps(x + c, mask8(in - c));
      hi = _mm256_maskload_ps(x + c + 8, mask8(in - c - 8));
    }
    a = _mm256_fmadd_ps(_mm256_load_ps(w), lo, a);
    a = _mm256_fmadd_ps(_mm256_load_ps(w + 8), hi, a);
  }
  return hsum256(a);
}

__attribute__((target("avx512f,fma"))) float row_avx512(const float* w, const float* x, int64_t in) {
  __m512 acc = _mm512_setzero_ps();
  const int64_t full = in / CHUNK * CHUNK;
  for (int64_t c = 0; c < in; c += CHUNK, w += R * CHUNK) {
    const __m512 xv = c < full ? _mm512_loadu_ps(x + c)
                               : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (in - c)) - 1), x + c);
    acc = _mm512_fmadd_ps(_mm512_load_ps(w), xv, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

int isa_level() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}

}  // namespace

extern "C" {

// 2: AVX-512F, 1: AVX2 + FMA, 0: neither (owngpt_gemv must not be called).
int owngpt_isa() { return isa_level(); }

// Floats the packed form of an [out, in] weight takes.
int64_t owngpt_packed_size(int64_t out, int64_t in) { return round_up(out, R) * round_up(in, CHUNK); }

// w: [out, in] row-major fp32 -> dst (owngpt_packed_size floats, 64-byte aligned, zero-filled by the caller).
void owngpt_pack(const float* w, float* dst, int64_t out, int64_t in) {
  const int64_t in_pad = round_up(in, CHUNK);
  for (int64_t o = 0; o < out; ++o) {
    float* block = dst + (o / R) * R * in_pad + (o % R) * CHUNK;
    for (int64_t i = 0; i < in; ++i) block[(i / CHUNK) * R * CHUNK + i % CHUNK] = w[o * in + i];
  }
}

// 1 where the CPU converts fp16 to fp32 in hardware (F16C; every AVX2 and AVX-512 CPU owngpt has met has it).
int owngpt_has_f16c() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("f16c") ? 1 : 0;
}

// y (rows, out) = x (rows, in) H^T over an fp16 copy H of a weight in owngpt_pack's layout (the packed fp32 weight
// converted element by element: the same positions, half the bytes), accumulated in fp32; no bias.
void owngpt_gemv_f16(const float* x, int64_t rows, const uint16_t* packed, float* y, int64_t out, int64_t in,
                     int threads, int level) {
  if (level <= 0 || level > isa_level() || !owngpt_has_f16c()) return;  // the Python side checks first
  const int64_t in_pad = round_up(in, CHUNK), blocks = round_up(out, R) / R;
  const bool parallel = threads > 1 && blocks * R * in_pad >= (1 << 19);  // >= 1 MiB of halves (see owngpt_gemv)
  const int64_t chunk = std::max<int64_t>(1, (1 << 16) / (R * in_pad));
#pragma omp parallel num_threads(threads) if (parallel)
  {
    float sums[R];
#pragma omp for schedule(dynamic, chunk) nowait
    for (int64_t b = 0; b < blocks; ++b) {
      const uint16_t* wb = packed + b * R * in_pad;
      const int64_t o0 = b * R, m = std::min(R, out - o0);
      for (int64_t r = 0; r < rows; ++r) {  // the block (8 rows of halves) stays in L1 for every x row
        if (level == 2) {
          block_avx512_f16(wb, x + r * in, in, sums);
        } else {
          block_avx2_f16(wb, x + r * in, in, sums);
        }
        float* yr = y + r * out + o0;
        for (int64_t j = 0; j < m; ++j) yr[j] = sums[j];
      }
    }
  }
}

// The screened head (owngpt/greedy_head.py explains the bound): y (rows, out) = x W^T + bias at every output that
// can be among its row's k largest, -inf elsewhere (k = 1: greedy). Reads the fp16 copy for all outputs
// (owngpt_gemv_f16), bounds each approximate value's distance from owngpt_gemv's fp32 value by
// scaled_norms[j] * ||x||_2 + c2 * ||x||_1 (+ 2^-20 (|y| + |bias|) with a bias), and recomputes in fp32, by
// owngpt_gemv's own arithmetic (bitwise its values), the outputs whose upper bound reaches the row's k-th largest
// lower bound. scratch: `out` floats (for k > 1). Returns 0, or 1 (y unusable: the caller takes the fp32 head) when
// a row's norms are not finite or it has more than max_candidates candidates.
int owngpt_greedy_head(const float* x, int64_t rows, const uint16_t* packed16, const float* packed,
                       const float* bias, const float* scaled_norms, float c2, float* y, int64_t out, int64_t in,
                       int threads, int level, int64_t k, float* scratch, int64_t max_candidates) {
  if (level <= 0 || level > isa_level() || !owngpt_has_f16c() || k < 1 || k > out) return 1;
  owngpt_gemv_f16(x, rows, packed16, y, out, in, threads, level);
  const int64_t in_pad = round_up(in, CHUNK);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * in;
    float* yr = y + r * out;
    double s2 = 0.0, s1 = 0.0;
    for (int64_t i = 0; i < in; ++i) {
      s2 += static_cast<double>(xr[i]) * xr[i];
      s1 += std::fabs(static_cast<double>(xr[i]));
    }
    const float l2 = static_cast<float>(std::sqrt(s2)), a1 = c2 * static_cast<float>(s1);
    if (!std::isfinite(l2) || !std::isfinite(a1)) return 1;
    auto err = [&](int64_t j) {
      const float e = scaled_norms[j] * l2 + a1;
      return bias ? e + 0x1p-20f * (std::fabs(yr[j]) + std::fabs(bias[j])) : e;
    };
    // the k-th largest lower bound: no row has fewer than k fp32 values at or above it
    float best_low = -INFINITY;
    for (int64_t j = 0; j < out; ++j) {
      if (bias) yr[j] += bias[j];
      const float low = yr[j] - err(j);
      if (k == 1) {
        best_low = std::max(best_low, low);
      } else {
        scratch[j] = low;
      }
    }
    if (k > 1) {
      std::nth_element(scratch, scratch + (k - 1), scratch + out, std::greater<float>());
      best_low = scratch[k - 1];
    }
    if (!std::isfinite(best_low)) return 1;
    int64_t n = 0;
    for (int64_t j = 0; j < out; ++j) n += yr[j] + err(j) >= best_low;
    if (n > max_candidates) return 1;
    for (int64_t j = 0; j < out; ++j) {
      if (yr[j] + err(j) >= best_low) {
        const float* w = packed + (j / R) * R * in_pad + (j % R) * CHUNK;
        yr[j] = (level == 2 ? row_avx512(w, xr, in) : row_avx2(w, xr, in)) + (bias ? bias[j] : 0.0f);
      } else {
        yr[j] = -INFINITY;
      }
    }
  }
  return 0;
}

// y (rows, out) = x (rows, in) W^T + bias (bias may be null); x and y contiguous, `packed` from owngpt_pack.
// level: the instruction set, at most owngpt_isa() (tests pass 1 to check the AVX2 code on an AVX-512 CPU).
void owngpt_gemv(const float* x, int64_t rows, const float* packed, const float* bias, float* y, int64_t out,
                 int64_t in, int threads, int level) {
  if (level <= 0 || level > isa_level()) return;  // not called so: the Python side checks owngpt_isa first
  const int64_t in_pad = round_up(in, CHUNK), blocks = round_up(out, R) / R;
  // a second thread pays (~5 us to wake) only on a weight that takes longer than that to read: >= 1 MiB
  const bool parallel = threads > 1 && blocks * R * in_pad >= (1 << 18);
  // blocks handed out in chunks of ~128 KiB of weights as threads ask for them (not in fixed halves): on a machine
  // where other work holds one core for a while, the other thread takes over the rest instead of waiting for it
  const int64_t chunk = std::max<int64_t>(1, (1 << 15) / (R * in_pad));
#pragma omp parallel num_threads(threads) if (parallel)
  {
    float sums[NX_MAX * R];
#pragma omp for schedule(dynamic, chunk) nowait
    for (int64_t b = 0; b < blocks; ++b) {
      const float* wb = packed + b * R * in_pad;
      const int64_t o0 = b * R, m = std::min(R, out - o0);
      for (int64_t r = 0; r < rows;) {
        const int64_t nx = level == 2 ? std::min<int64_t>(NX_MAX, rows - r) : 1;
        if (level == 1) {
          block_avx2(wb, x + r * in, in, sums);
        } else if (nx == 3) {
          block_avx512<3>(wb, x + r * in, in, sums);
        } else if (nx == 2) {
          block_avx512<2>(wb, x + r * in, in, sums);
        } else {
          block_avx512<1>(wb, x + r * in, in, sums);
        }
        for (int64_t n = 0; n < nx; ++n, ++r) {
          float* yr = y + r * out + o0;
          for (int64_t j = 0; j < m; ++j) yr[j] = sums[n * R + j] + (bias ? bias[o0 + j] : 0.0f);
        }
      }
    }
  }
}

}  // extern "C"
