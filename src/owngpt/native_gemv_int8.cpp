// owngpt's int8 matrix-vector product for CPU decoding: y = (x W^T) * scale + b for one row x (or a few, one after
// another), W int8 with one fp32 scale per output channel (owngpt's int8 export), laid out once at load time. Built
// with native_gemv.cpp into one library by owngpt/native_kernels.py and called through ctypes; plain C functions.
//
// Why by hand: at batch 1 an int8 decode step streams every int8 weight once, and torch's int8 kernel
// (fbgemm's quantized::linear_dynamic) pays per call to quantize the activation in torch, to compute its
// per-tensor zero point and to requantize the output, around a kernel written for batches. This one does what
// llama.cpp's q8_0 dot product does, with owngpt's weight format: one sequential stream of weights, x quantized once
// per call, integer products summed in int32 per block of 32 columns, 8 output rows per pass. Measured on the 2-core
// AVX2 EPYC (gpt2 size, bench/bench_decode_step.py --int8, medians of 9 paired ratios of runs timed next to each
// other, on a machine shared with other work: load average ~8): the 49 products 1.21x fbgemm's speed on one thread
// and 1.98x on two (fbgemm's one-row product barely uses the second thread), the whole int8 decode step 1.11x and
// 1.12x; that step went from 0.78x to 0.88x llama.cpp q8_0's step on one thread in the same run.
//
// Activations: quantized per call, symmetric, one fp32 scale per block of 32 columns (llama.cpp's q8_0 activation
// format): d = max|x_block| / 127, q = round_half_even(x / d) computed as x * (1 / d) (d = 0: q = 0). Why blocks and
// not one scale per row: transformer activations have a few outlier channels (GPT-2's reach hundreds where the rest
// are ~1), and one scale per row makes every other channel's step that coarse; per block an outlier coarsens only its
// own 32 columns. The price is one int32 -> float conversion and one multiply-add per block per output row, which
// the memory-bound loop hides. Symmetric int8 also avoids fbgemm's 7-bit activations on CPUs without VNNI (the
// products below never saturate: |q| <= 127, so |w| * |q| * 2 <= 32258 < 32767 in vpmaddubsw's 16-bit sums).
//
//     y[o] = scale[o] * sum_blocks d_b * isum_b(o) + bias[o],   isum_b(o) = sum_{i in b} W[o, i] q[i]   (exact int32)
//
// Layout (made once by owngpt_int8_pack): the [out, in] int8 weight is cut into blocks of R = 8 output rows; inside a
// block the columns go in chunks of 32 bytes (one activation block), and for each chunk the 8 rows' 32 bytes are
// stored one after another: packed[block][chunk][row 0..7][32 bytes]; a block (8 * in_pad bytes) is one contiguous
// stream. `in` is padded with zero columns to in_pad (a multiple of 32) and `out` with zero rows to a multiple of 8; the
// quantized x is padded with zeros too, so the loops have no ragged edges.
//
// Three instruction sets, chosen at run time from the CPU's flags (owngpt_isa_int8): AVX2 (vpmaddubsw on |w| and
// x * sign(w), vpmaddwd to int32: the usual sign trick), AVX512BW (the same on 64 bytes = two rows of a chunk at a
// time, the sign applied with a mask since AVX-512 has no vpsignb), and AVX512-VNNI (vpdpbusd: the two multiply steps
// in one instruction). Activation quantization is AVX2 in every case.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t R = 8;    // output rows per block
constexpr int64_t QK = 32;  // columns per activation block (one scale) and per weight chunk

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

__attribute__((target("avx2,fma"))) float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// x (in floats) -> q (in_pad int8, zeros past `in`) and d (one scale per block of 32), as described at the top.
__attribute__((target("avx2,fma"))) void quantize_row(const float* x, int64_t in, int8_t* q, float* d) {
  const int64_t nb = (in + QK - 1) / QK;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  // packs below interleave 128-bit lanes; this puts the 8 groups of 4 bytes back in column order
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t c0 = b * QK, n = std::min<int64_t>(QK, in - c0);
    float tail[QK];
    const float* xs = x + c0;
    if (n < QK) {  // the last, partial block: zeros past `in`
      std::memset(tail, 0, sizeof tail);
      std::memcpy(tail, xs, n * sizeof(float));
      xs = tail;
    }
    __m256 v[4];
    for (int k = 0; k < 4; ++k) v[k] = _mm256_loadu_ps(xs + 8 * k);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                             _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float db = _mm_cvtss_f32(h) / 127.0f;
    const float id = db != 0.0f ? 1.0f / db : 0.0f;
    d[b] = db;
    const __m256 mul = _mm256_set1_ps(id);
    __m256i i[4];
    for (int k = 0; k < 4; ++k)
      i[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[k], mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + c0), _mm256_permutevar8x32_epi32(p, order));
  }
}

// One block of 8 weight rows times one quantized x: sums[r] = sum_b d_b * isum_b(row r).
__attribute__((target("avx2,fma"))) void block_avx2(const int8_t* w, const int8_t* xq, const float* d, int64_t nb,
                                                    float* sums) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b, w += R * QK) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * QK));
    const __m256 dv = _mm256_set1_ps(d[b]);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + r * QK));
      // |w| (unsigned) times x * sign(w) (signed) = w * x, pairs summed to int16, then to int32
      const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
      const __m256i p32 = _mm256_madd_epi16(p16, ones);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), dv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = hsum256(acc[r]);
}

// The same block with 64-byte registers: each load holds rows 2p and 2p + 1 of a chunk, x's 32 bytes broadcast to
// both halves. One body for both instruction sets (a macro: each function needs its own target attribute, so that
// the AVX512BW one cannot contain a VNNI instruction); DOT(aw, sx) is the int32 sum of each 4 products.
#define OWNGPT_BLOCK_AVX512(DOT)                                                                                     \
  __m512 acc[R / 2];                                                                                                 \
  for (int p = 0; p < R / 2; ++p) acc[p] = _mm512_setzero_ps();                                                      \
  const __m512i zero = _mm512_setzero_si512();                                                                       \
  const __m512i ones = _mm512_set1_epi16(1);                                                                         \
  (void)ones;                                                                                                        \
  for (int64_t b = 0; b < nb; ++b, w += R * QK) {                                                                    \
    const __m512i xv = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * QK)));   \
    const __m512 dv = _mm512_set1_ps(d[b]);                                                                          \
    _Pragma("GCC unroll 4") for (int p = 0; p < R / 2; ++p) {                                                        \
      const __m512i wv = _mm512_load_si512(w + p * 2 * QK);                                                          \
      const __m512i aw = _mm512_abs_epi8(wv); /* |w|, unsigned */                                                    \
      /* x * sign(w): negated where w < 0 (AVX-512 has no vpsignb; where w = 0, |w| = 0 zeroes the product) */       \
      const __m512i sx = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(wv), zero, xv);                                \
      acc[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(DOT(aw, sx)), dv, acc[p]);                                         \
    }                                                                                                                \
  }                                                                                                                  \
  for (int p = 0; p < R / 2; ++p) {                                                                                  \
    const __m256 lo = _mm512_castps512_ps256(acc[p]);                                                                \
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[p]), 1));                         \
    sums[2 * p] = hsum256(lo);                                                                                       \
    sums[2 * p + 1] = hsum256(hi);                                                                                   \
  }

#define OWNGPT_DOT_VNNI(a, b) _mm512_dpbusd_epi32(zero, a, b)
#define OWNGPT_DOT_BW(a, b) _mm512_madd_epi16(_mm512_maddubs_epi16(a, b), ones)

__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma"))) void block_vnni(const int8_t* w, const int8_t* xq,
                                                                              const float* d, int64_t nb,
                                                                              float* sums) {
  OWNGPT_BLOCK_AVX512(OWNGPT_DOT_VNNI)
}

__attribute__((target("avx512f,avx512bw,avx2,fma"))) void block_avx512bw(const int8_t* w, const int8_t* xq,
                                                                       const float* d, int64_t nb, float* sums) {
  OWNGPT_BLOCK_AVX512(OWNGPT_DOT_BW)
}

int isa_level() {
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return 0;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
    return __builtin_cpu_supports("avx512vnni") ? 3 : 2;
  }
  return 1;
}

}  // namespace

extern "C" {

// 3: AVX512-VNNI, 2: AVX512BW, 1: AVX2 + FMA, 0: none of them (owngpt_int8_gemv must not be called).
int owngpt_isa_int8() { return isa_level(); }

// Bytes the packed form of an [out, in] int8 weight takes.
int64_t owngpt_int8_packed_size(int64_t out, int64_t in) { return round_up(out, R) * round_up(in, QK); }

// w: [out, in] row-major int8 -> dst (owngpt_int8_packed_size bytes, 64-byte aligned, zero-filled by the caller).
void owngpt_int8_pack(const int8_t* w, int8_t* dst, int64_t out, int64_t in) {
  const int64_t in_pad = round_up(in, QK);
  for (int64_t o = 0; o < out; ++o) {
    int8_t* block = dst + (o / R) * R * in_pad + (o % R) * QK;
    for (int64_t i = 0; i < in; ++i) block[(i / QK) * R * QK + i % QK] = w[o * in + i];
  }
}

// Quantizes x (rows, in) as the kernel does: q (rows, in_pad) int8, d (rows, in_pad / 32) fp32 (tests compare it with
// their own reference of the scheme).
void owngpt_int8_quantize(const float* x, int64_t rows, int64_t in, int8_t* q, float* d) {
  if (isa_level() == 0) return;
  const int64_t nb = (in + QK - 1) / QK;
  for (int64_t r = 0; r < rows; ++r) quantize_row(x + r * in, in, q + r * nb * QK, d + r * nb);
}

// y (rows, out) = (x (rows, in) W^T) * scale + bias (bias may be null); x and y contiguous fp32, `packed` from
// owngpt_int8_pack, scale [out] fp32. level: the instruction set, at most owngpt_isa_int8() (tests lower it).
void owngpt_int8_gemv(const float* x, int64_t rows, const int8_t* packed, const float* scale, const float* bias,
                      float* y, int64_t out, int64_t in, int threads, int level) {
  if (level <= 0 || level > isa_level()) return;  // not called so: the Python side checks owngpt_isa_int8 first
  const int64_t nb = (in + QK - 1) / QK, in_pad = nb * QK, blocks = round_up(out, R) / R;
  std::vector<int8_t> xq(rows * in_pad);
  std::vector<float> xd(rows * nb);
  for (int64_t r = 0; r < rows; ++r) quantize_row(x + r * in, in, xq.data() + r * in_pad, xd.data() + r * nb);
  // as in native_gemv.cpp: a second thread only on a weight of >= 1 MiB, blocks handed out in ~128 KiB chunks
  const bool parallel = threads > 1 && blocks * R * in_pad >= (1 << 20);
  const int64_t chunk = std::max<int64_t>(1, (1 << 17) / (R * in_pad));
#pragma omp parallel num_threads(threads) if (parallel)
  {
    float sums[R];
#pragma omp for schedule(dynamic, chunk) nowait
    for (int64_t b = 0; b < blocks; ++b) {
      const int8_t* wb = packed + b * R * in_pad;
      const int64_t o0 = b * R, m = std::min(R, out - o0);
      for (int64_t r = 0; r < rows; ++r) {
        const int8_t* q = xq.data() + r * in_pad;
        const float* d = xd.data() + r * nb;
        if (level == 3) {
          block_vnni(wb, q, d, nb, sums);
        } else if (level == 2) {
          block_avx512bw(wb, q, d, nb, sums);
        } else {
          block_avx2(wb, q, d, nb, sums);
        }
        float* yr = y + r * out + o0;
        for (int64_t j = 0; j < m; ++j) yr[j] = sums[j] * scale[o0 + j] + (bias ? bias[o0 + j] : 0.0f);
      }
    }
  }
}

}  // extern "C"
