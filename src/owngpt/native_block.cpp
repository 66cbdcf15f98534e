// One block of a decode step in one call, GPT-2's or LLaMA's: y = h + attn(norm1(h)), then y + mlp(norm2(y)), for
// a few rows, each with its own KV cache in the engine's buffers. Built into owngpt's native library with native_gemv.cpp (its
// products go through owngpt_gemv) and called by owngpt.decode_step through ctypes.
//
// Why by hand: at gpt2 size a decode step's 49 products stream the weights at the memory's speed, and around them
// the Python step (owngpt.decode_step) made ~25 torch calls per block (layer norms, the KV writes, slicing,
// scaled_dot_product_attention, GELU, residual adds), each a few microseconds of dispatch for a few microseconds of
// work: on the 2-core AVX2 CPU that was ~10-20% of a batch-1 step and more at batch 8, time in which the memory bus
// sits idle. llama.cpp's step does the same work in C with no dispatch; so does this, for GPT-2's and LLaMA's blocks
// (batches of more than a few rows, and positions past LLaMA's rotary table, keep the Python step). The arithmetic is the model's (fp32
// throughout), in another order of the sums: tests/test_decode_kernels.py checks greedy tokens against the unpacked
// model and the logits against a fresh forward.
//
// Compiled with AVX2 + FMA (every CPU the gemv kernels run on has them); the products go through the fp32 or the int8
// kernel (owngpt_gemv, owngpt_int8_gemv) at the level the Python side passes.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#endif

extern "C" void owngpt_gemv(const float* x, int64_t rows, const float* packed, const float* bias, float* y,
                            int64_t out, int64_t in, int threads, int level);
extern "C" void owngpt_int8_gemv(const float* x, int64_t rows, const int8_t* packed, const float* scale,
                                 const float* bias, float* y, int64_t out, int64_t in, int threads, int level);

// One projection of a block: a weight packed by owngpt_pack (fp32, scale null) or by owngpt_int8_pack (int8, with
// its per-output-channel scales), and its bias (may be null).
struct OwngptProduct {
  const void* w;
  const float* scale;
  const float* bias;
};

namespace {

// y (rows, out) = x (rows, in) W^T + b through the kernel of the projection's kind
void product(const OwngptProduct& p, const float* x, int64_t rows, float* y, int64_t out, int64_t in, int threads,
             int level, int int8_level) {
  if (p.scale)
    owngpt_int8_gemv(x, rows, static_cast<const int8_t*>(p.w), p.scale, p.bias, y, out, in, threads, int8_level);
  else
    owngpt_gemv(x, rows, static_cast<const float*>(p.w), p.bias, y, out, in, threads, level);
}

#define OWNGPT_AVX2 __attribute__((target("avx2,fma")))

OWNGPT_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

OWNGPT_AVX2 float dot(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = hsum(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += a * x
OWNGPT_AVX2 void axpy(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// y += x
OWNGPT_AVX2 void add_into(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)));
  for (; i < n; ++i) y[i] += x[i];
}

// e^x for 8 lanes: Cephes' single-precision exp (range reduction by ln 2, a degree-5 polynomial; ~1 ulp), as in
// the well-known avx_mathfun; inputs clamped to +-88.38 (no inf/nan: callers pass finite values)
OWNGPT_AVX2 __m256 exp8(__m256 x) {
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
}

// GELU in place: the tanh approximation (GPT-2's gelu_new) or the exact erf form
OWNGPT_AVX2 void gelu(float* x, int64_t n, bool tanh_form) {
  int64_t i = 0;
  if (tanh_form) {
    const __m256 c = _mm256_set1_ps(0.7978845608028654f), k = _mm256_set1_ps(0.044715f);
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), half = _mm256_set1_ps(0.5f);
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      const __m256 u = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(k, v), _mm256_mul_ps(v, v), v));
      // tanh(u) = 1 - 2 / (e^(2u) + 1): exact limits at both ends (e^(2u) clamps instead of overflowing)
      const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp8(_mm256_add_ps(u, u)), one)));
      _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, t)));
    }
    for (; i < n; ++i) {
      const float v = x[i];
      x[i] = 0.5f * v * (1.0f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    }
  } else {
    for (; i < n; ++i) x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.7071067811865476f));
  }
}

// y = (x - mean) / sqrt(var + eps) * w + b over one row of n (torch's layer_norm: biased variance)
OWNGPT_AVX2 void layer_norm(const float* x, const float* w, const float* b, float eps, float* y, int64_t n) {
  __m256 s = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(x + i));
  float sum = hsum(s);
  for (; i < n; ++i) sum += x[i];
  const float mean = sum / static_cast<float>(n);
  const __m256 m = _mm256_set1_ps(mean);
  s = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), m);
    s = _mm256_fmadd_ps(d, d, s);
  }
  float ss = hsum(s);
  for (; i < n; ++i) ss += (x[i] - mean) * (x[i] - mean);
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  const __m256 iv = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), m), iv);
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(d, _mm256_loadu_ps(w + i), _mm256_loadu_ps(b + i)));
  }
  for (; i < n; ++i) y[i] = (x[i] - mean) * inv * w[i] + b[i];
}

// y = x / sqrt(mean(x^2) + eps) * w over one row of n (LlamaRMSNorm, fp32)
OWNGPT_AVX2 void rms_norm(const float* x, const float* w, float eps, float* y, int64_t n) {
  __m256 s = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    s = _mm256_fmadd_ps(v, v, s);
  }
  float ss = hsum(s);
  for (; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  const __m256 iv = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), iv), _mm256_loadu_ps(w + i)));
  for (; i < n; ++i) y[i] = x[i] * inv * w[i];
}

// gate = silu(gate) * up, in place on gate (LLaMA's MLP)
OWNGPT_AVX2 void silu_mul(float* gate, const float* up, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 sg = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(gate + i, _mm256_mul_ps(sg, _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

// rotary embedding of one head vector in place: x cos + rotate_half(x) sin, with rotate_half's sign already in
// `sin` (owngpt.decode_step's table): out[i] = x[i] cos[i] + x[(i + D/2) mod D] sin[i]
void rope(float* x, const float* cos, const float* sin, int64_t D, float* tmp) {
  const int64_t half = D / 2;
  std::copy(x, x + D, tmp);
  for (int64_t i = 0; i < D; ++i) x[i] = tmp[i] * cos[i] + tmp[(i + half) % D] * sin[i];
}

// softmax(q . k_t * scale) over t in [t0, t1], times v_t, into o (D floats); scores: room for t1 - t0 + 1 floats
OWNGPT_AVX2 void attend_one(const float* q, const float* k, const float* v, int64_t t0, int64_t t1, int64_t D,
                            float scale, float* scores, float* o) {
  const int64_t n = t1 - t0 + 1;
  float mx = -INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    scores[t] = dot(q, k + (t0 + t) * D, D) * scale;
    mx = std::max(mx, scores[t]);
  }
  const __m256 mv = _mm256_set1_ps(mx);
  __m256 s = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), mv));
    _mm256_storeu_ps(scores + t, e);
    s = _mm256_add_ps(s, e);
  }
  float sum = hsum(s);
  for (; t < n; ++t) {
    scores[t] = std::exp(scores[t] - mx);
    sum += scores[t];
  }
  const float inv = 1.0f / sum;
  std::fill(o, o + D, 0.0f);
  for (t = 0; t < n; ++t) axpy(scores[t] * inv, v + (t0 + t) * D, o, D);
}

// this thread's slice of the attention scores buffer (one slice of `n` floats per thread; no allocation here, so
// nothing can throw inside a parallel region or through the C interface)
inline float* thread_scores(float* scores, int64_t n) {
#ifdef _OPENMP
  return scores + static_cast<int64_t>(omp_get_thread_num()) * n;
#else
  return scores;
#endif
}

}  // namespace

extern "C" {

// One GPT-2 block for `rows` rows, in place on h (rows, C). p: its 4 projections ([out, in] = c_attn [3C, C],
// c_proj [C, C], c_fc [I, C], mlp c_proj [C, I]), fp32 or int8. kbuf, vbuf: this layer's engine buffers (B_cap, H,
// l_cap, D) contiguous; this step's key and value go to column `length`, and row b attends to columns
// valid_from[b] .. length (valid_from null: from 0). scratch: rows * (5C + I) + threads * (length + 1) floats (the last
// part: each thread's attention scores). gelu_tanh: 1 for GPT-2's tanh
// GELU, 0 for the erf form. level, int8_level: the instruction sets of owngpt_gemv and owngpt_int8_gemv.
void owngpt_gpt2_block(float* h, int64_t rows, int64_t C, int64_t H, int64_t I, const float* ln1_w,
                       const float* ln1_b, const float* ln2_w, const float* ln2_b, float eps, const OwngptProduct* p,
                       int gelu_tanh, float* kbuf, float* vbuf, int64_t l_cap, int64_t length,
                       const int64_t* valid_from, float scale, float* scratch, int threads, int level,
                       int int8_level) {
  const int64_t D = C / H;
  float* x = scratch;             // rows * C: a layer norm's output
  float* qkv = x + rows * C;      // rows * 3C
  float* att = qkv + rows * 3 * C;  // rows * C: the heads' outputs
  float* mid = att + rows * C;    // rows * I: the MLP's inner activations
  float* out = x;                 // rows * C: a product added into h (x is free by then)
  float* scores = mid + rows * I;  // threads * (length + 1)

  for (int64_t b = 0; b < rows; ++b) layer_norm(h + b * C, ln1_w, ln1_b, eps, x + b * C, C);
  product(p[0], x, rows, qkv, 3 * C, C, threads, level, int8_level);

  // the heads: write this step's key and value, attend over the row's columns; rows x heads in parallel when the
  // work pays for a second thread's wake-up
  const int64_t pairs = rows * H;
  const bool parallel = threads > 1 && pairs * (length + 1) * D >= (1 << 16);
#pragma omp parallel num_threads(threads) if (parallel)
  {
    float* mine = thread_scores(scores, length + 1);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t b = p / H, hh = p % H;
      const float* row = qkv + b * 3 * C;
      float* kb = kbuf + (b * H + hh) * l_cap * D;
      float* vb = vbuf + (b * H + hh) * l_cap * D;
      std::copy(row + C + hh * D, row + C + (hh + 1) * D, kb + length * D);
      std::copy(row + 2 * C + hh * D, row + 2 * C + (hh + 1) * D, vb + length * D);
      const int64_t t0 = valid_from ? valid_from[b] : 0;
      attend_one(row + hh * D, kb, vb, t0, length, D, scale, mine, att + b * C + hh * D);
    }
  }

  product(p[1], att, rows, out, C, C, threads, level, int8_level);
  add_into(out, h, rows * C);
  for (int64_t b = 0; b < rows; ++b) layer_norm(h + b * C, ln2_w, ln2_b, eps, x + b * C, C);
  product(p[2], x, rows, mid, I, C, threads, level, int8_level);
  gelu(mid, rows * I, gelu_tanh != 0);
  product(p[3], mid, rows, out, C, I, threads, level, int8_level);
  add_into(out, h, rows * C);
}

// One LLaMA block for `rows` rows, in place on h (rows, C): RMSNorm, q/k/v products (H and Hkv heads of D), the
// rotary embedding from the step's table (cos, sin: (positions, D) rows, sin with rotate_half's sign; row b at
// pos[b]), grouped-query attention over the row's columns, o product, residual; RMSNorm, SiLU(gate) * up, down
// product, residual. p: its 7 projections (q, k, v, o, gate, up, down; [out, in]), fp32 or int8. kbuf, vbuf:
// (B_cap, Hkv, l_cap, D) contiguous. scratch: rows * (C + 2 H D + 2 Hkv D + 2 I + C) + D + threads * (length + 1)
// floats (the last part: each thread's attention scores).
void owngpt_llama_block(float* h, int64_t rows, int64_t C, int64_t H, int64_t Hkv, int64_t D, int64_t I,
                        const float* norm1, const float* norm2, float eps1, float eps2, const OwngptProduct* p,
                        const float* cos, const float* sin, const int64_t* pos, float* kbuf, float* vbuf,
                        int64_t l_cap, int64_t length, const int64_t* valid_from, float scale, float* scratch,
                        int threads, int level, int int8_level) {
  const int64_t qd = H * D, kvd = Hkv * D, group = H / Hkv;
  float* x = scratch;            // rows * C
  float* q = x + rows * C;       // rows * qd
  float* k = q + rows * qd;      // rows * kvd
  float* v = k + rows * kvd;     // rows * kvd
  float* att = v + rows * kvd;   // rows * qd
  float* gate = att + rows * qd;  // rows * I
  float* up = gate + rows * I;   // rows * I
  float* out = up + rows * I;    // rows * C
  float* tmp = out + rows * C;   // D
  float* scores = tmp + D;       // threads * (length + 1)

  for (int64_t b = 0; b < rows; ++b) rms_norm(h + b * C, norm1, eps1, x + b * C, C);
  product(p[0], x, rows, q, qd, C, threads, level, int8_level);
  product(p[1], x, rows, k, kvd, C, threads, level, int8_level);
  product(p[2], x, rows, v, kvd, C, threads, level, int8_level);
  for (int64_t b = 0; b < rows; ++b) {
    const float* c = cos + pos[b] * D;
    const float* s = sin + pos[b] * D;
    for (int64_t hh = 0; hh < H; ++hh) rope(q + b * qd + hh * D, c, s, D, tmp);
    for (int64_t hh = 0; hh < Hkv; ++hh) {
      float* kh = k + b * kvd + hh * D;
      rope(kh, c, s, D, tmp);
      const int64_t slot = ((b * Hkv + hh) * l_cap + length) * D;
      std::copy(kh, kh + D, kbuf + slot);
      std::copy(v + b * kvd + hh * D, v + b * kvd + (hh + 1) * D, vbuf + slot);
    }
  }
  const int64_t pairs = rows * H;
  const bool parallel = threads > 1 && pairs * (length + 1) * D >= (1 << 16);
#pragma omp parallel num_threads(threads) if (parallel)
  {
    float* mine = thread_scores(scores, length + 1);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t b = p / H, hh = p % H, kv = hh / group;
      const float* kb = kbuf + (b * Hkv + kv) * l_cap * D;
      const float* vb = vbuf + (b * Hkv + kv) * l_cap * D;
      const int64_t t0 = valid_from ? valid_from[b] : 0;
      attend_one(q + b * qd + hh * D, kb, vb, t0, length, D, scale, mine, att + b * qd + hh * D);
    }
  }
  product(p[3], att, rows, out, C, qd, threads, level, int8_level);
  add_into(out, h, rows * C);
  for (int64_t b = 0; b < rows; ++b) rms_norm(h + b * C, norm2, eps2, x + b * C, C);
  product(p[4], x, rows, gate, I, C, threads, level, int8_level);
  product(p[5], x, rows, up, I, C, threads, level, int8_level);
  silu_mul(gate, up, rows * I);
  product(p[6], gate, rows, out, C, I, threads, level, int8_level);
  add_into(out, h, rows * C);
}

}  // extern "C"
