/* QuickSilver native decode step: every op of a Llama-family decode step in one C call.

   For B rows, each the next token of one sequence whose cache is a row of a pooled,
   head-major K/V buffer, and for every layer:
     x = RMSNorm(h); qkv = x @ Wqkv^T; RoPE(q, k) with the caller's cos/sin tables;
     k, v -> the row's cache at index count; attention of each query head over entries
     [0, count] of its row (GQA); h += att @ Wo^T; x = RMSNorm(h);
     a = SiLU(x @ Wgate^T) * (x @ Wup^T); h += a @ Wdown^T;
   then, optionally, the final RMSNorm and the LM head (logits in float32).

   Arithmetic is float32 throughout (the residual stream too); with bfloat16 activations only
   the cache entries and the step's input/output rows are bfloat16, and, on a CPU with AVX-512
   BF16, each matmul's input rows (rounded once, as the model's bfloat16 linears see them; the
   products are exact and summed in float32: see tile_dp). Weights: float32 or
   bfloat16 (the model's row-major tensors), int8 with one scale per output channel, or
   group-wise asymmetric 4-bit in groups of 32 (GGUF's block_q4_1: float16 scale d and minimum
   m, w = d * q + m, q in 0..15, 16 bytes of codes, byte j holding weight j in its low nibble
   and weight j + 16 in its high one); int8 and 4-bit copies interleave 4 rows (see row_at).

   One OpenMP parallel region per step, five barriers per layer; the matmuls share out blocks
   of 4 output channels, attention (row, KV head, chunk of 64 entries) units, merged per head
   afterwards. Each output element is one dot product in a fixed order (vector lanes over the
   input channels, then the lanes summed as a tree), so a row's result does not depend on the
   other rows of the call or on the thread count (bit for bit; a test checks). Built with
   -ffp-contract=off: every fused multiply-add is written (fmadd).

   Optional -DQS_TIMING: seconds per phase of the steps run (qs_phase_seconds, thread 0's clock).

   SIMD: GCC/Clang vector extensions of QS_VW floats, chosen at compile time from -march=native
   (16 lanes where AVX-512F exists, 8 with AVX, else 4: SSE2 on any x86-64, NEON on ARM, plain
   scalar code elsewhere); the same source is every path. -DQS_VW=N overrides (tests build the
   other widths to check that they agree). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__F16C__) || defined(__FMA__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef QS_VW
#if defined(__AVX512F__)
#define QS_VW 16
#elif defined(__AVX__)
#define QS_VW 8
#else
#define QS_VW 4
#endif
#endif
#define VW QS_VW

typedef float vf __attribute__((vector_size(4 * VW)));
typedef uint32_t vu __attribute__((vector_size(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW)));
typedef uint16_t vh __attribute__((vector_size(2 * VW)));
typedef uint8_t vb __attribute__((vector_size(VW)));

enum { QS_F32 = 0, QS_BF16 = 1, QS_I8 = 2, QS_Q4 = 3 };
enum { QS_ERR_SHAPE = -1, QS_ERR_WEIGHT = -2, QS_ERR_CACHE = -3, QS_ERR_MEMORY = -4 };

typedef struct {
  int32_t fmt, out, in, group; /* group: inputs per (scale, min) of QS_Q4, 32 */
  const void* w;               /* float32 | bfloat16 (out, in) row-major; int8 | 4-bit blocks: see row_at */
  const float* scale;          /* QS_I8: (out,) */
  const uint16_t* sm;          /* unused (0) */
  const float* bias;           /* (out,) or NULL */
} qs_weight;

typedef struct {
  qs_weight qkv, o, gate_up, down; /* qkv: q, k, v rows stacked; gate_up: gate rows, then up rows */
  const float* attn_norm;          /* (d,) */
  const float* mlp_norm;           /* (d,) */
} qs_layer;

typedef struct {
  int32_t n_layers, d, n_heads, n_kv_heads, head_dim, d_ff, act_bf16;
  float eps, attn_scale;
} qs_shape;


static inline vf ldf(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void stf(float* p, vf v) { memcpy(p, &v, sizeof v); }

/* Weights to float vectors: VW bfloat16s, VW int8s, or the low / high nibbles of VW bytes.
   Intrinsics where the width matches the ISA (compilers scalarize some of these conversions
   when written with vector extensions), the generic vector code elsewhere. */
#if VW == 8 && defined(__AVX2__)
#define QS_ISA "avx2"
static inline vf w_bf16(const uint16_t* p) {
  return (vf)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline vf w_i8(const int8_t* p) { return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
static inline vf w_lo(const uint8_t* p) {
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  return (vf)_mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
}
static inline vf w_hi(const uint8_t* p) {
  return (vf)_mm256_cvtepi32_ps(_mm256_srli_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)), 4));
}
#elif VW == 16 && defined(__AVX512F__)
#define QS_ISA "avx512"
static inline vf w_bf16(const uint16_t* p) {
  return (vf)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline vf w_i8(const int8_t* p) { return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
static inline vf w_lo(const uint8_t* p) {
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  return (vf)_mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
}
static inline vf w_hi(const uint8_t* p) {
  return (vf)_mm512_cvtepi32_ps(_mm512_srli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)), 4));
}
#else
#define QS_ISA "generic"
static inline vf w_bf16(const uint16_t* p) { vh h; memcpy(&h, p, sizeof h); return (vf)(__builtin_convertvector(h, vu) << 16); }
static inline vf w_i8(const int8_t* p) { /* int8 -> int32 through uint8 (sign-extension is scalarized by some compilers) */
  vb b; memcpy(&b, p, sizeof b);
  return __builtin_convertvector(__builtin_convertvector(b ^ 0x80, vi) - 128, vf);
}
static inline vf w_lo(const uint8_t* p) { vb b; memcpy(&b, p, sizeof b); return __builtin_convertvector(__builtin_convertvector(b, vi) & 15, vf); }
static inline vf w_hi(const uint8_t* p) { vb b; memcpy(&b, p, sizeof b); return __builtin_convertvector(__builtin_convertvector(b, vi) >> 4, vf); }
#endif
/* a * b + c. Built with -ffp-contract=off, so that the compiler never fuses a product and a sum on
   its own (it did so in some inlined tiles and not in others, and a row's result then depended on
   the tile that computed it): fused exactly where written, here. */
static inline vf fmadd(vf a, vf b, vf c) {
#if VW == 16 && defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif VW == 8 && defined(__FMA__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#elif VW == 4 && defined(__FMA__)
  return (vf)_mm_fmadd_ps((__m128)a, (__m128)b, (__m128)c);
#else
  return a * b + c;
#endif
}
/* The sum of the lanes, as a tree (halves added, then their halves...): a fixed order. */
/* The sum of v's lanes, pairwise: lane i += lane i + w for w = VW/2, ..., 1. In vector shuffles (the scalar
   tree through memory, HSUM_SCALAR, measured slower: it runs once per output and row of every matmul and per
   score of attention); the same additions in the same order, so the same sum either way. */
static inline float hsum(vf v) {
#if defined(HSUM_SCALAR) || !(VW == 4 || VW == 8 || VW == 16)
  float a[VW];
  memcpy(a, &v, sizeof v);
  for (int w = VW / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; i++) a[i] += a[i + w];
  return a[0];
#else
#define SH(...) __builtin_shufflevector(v, v, __VA_ARGS__)
#if VW == 16
  v += SH(8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15);
  v += SH(4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7);
  v += SH(2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
  v += SH(1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1);
#elif VW == 8
  v += SH(4, 5, 6, 7, 4, 5, 6, 7);
  v += SH(2, 3, 2, 3, 2, 3, 2, 3);
  v += SH(1, 1, 1, 1, 1, 1, 1, 1);
#else
  v += SH(2, 3, 2, 3);
  v += SH(1, 1, 1, 1);
#endif
#undef SH
  return v[0];
#endif
}

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) { /* round to nearest even, NaN kept quiet */
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
static inline float h2f(uint16_t h) { /* float16 bits -> float32, exact */
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  uint32_t s = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31u, m = h & 1023u, u;
  if (e == 0) { float f = (float)m * 5.9604644775390625e-8f; return s ? -f : f; }
  u = e == 31 ? (s | 0x7f800000u | (m << 13)) : (s | ((e + 112u) << 23) | (m << 13));
  float f; memcpy(&f, &u, 4); return f;
#endif
}

int qs_step_lanes(void) { return VW; }


#include "step_matmul.h"

/* ---- pointwise --------------------------------------------------------------------------- */

static inline vf vmax(vf a, vf b) { vi m = a > b; return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vf vmin(vf a, vf b) { vi m = a < b; return (vf)(((vi)a & m) | ((vi)b & ~m)); }

/* exp(x) in float32 for VW lanes, within a few ulp (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2,
   a degree-7 polynomial in r, times 2^n); x is clamped to [-87, 88]. */
static inline vf exp_v(vf x) {
  x = vmin(vmax(x, (vf){0} - 87.f), (vf){0} + 88.f);
  vf n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f; /* round to nearest */
  vf r = fmadd(n, (vf){0} - 0.693359375f, x);
  r = fmadd(n, (vf){0} + 2.12194440e-4f, r);
  vf p = (vf){0} + 1.9875691500e-4f;
  p = fmadd(p, r, (vf){0} + 1.3981999507e-3f);
  p = fmadd(p, r, (vf){0} + 8.3334519073e-3f);
  p = fmadd(p, r, (vf){0} + 4.1665795894e-2f);
  p = fmadd(p, r, (vf){0} + 1.6666665459e-1f);
  p = fmadd(p, r, (vf){0} + 5.0000001201e-1f);
  p = fmadd(p * r, r, r) + 1.f;
  return p * (vf)((__builtin_convertvector(n, vi) + 127) << 23);
}

/* A[r][j] = SiLU(gate_j . x_r) * (up_j . x_r), j < F: gate rows 0..F-1, up rows F..2F-1 of w.
   Runs of grab(F / OB) blocks go to whichever thread is free; SiLU VW outputs at a time. */
static void gate_up_silu(const qs_weight* w, const float* X, size_t ldx, int R, float* A, int F, float* xp, int dp) {
  const int bf = prep_rows(w, X, ldx, R, xp, dp);
  const int nb = F / OB, per = grab(nb);
#pragma omp for schedule(dynamic, 1)
  for (int ch = 0; ch < (nb + per - 1) / per; ch++) {
    int b0 = ch * per, b1 = b0 + per < nb ? b0 + per : nb, n = (b1 - b0) * OB;
    for (int r0 = 0; r0 < R; r0 += RB) {
      int rt = R - r0 < RB ? R - r0 : RB;
      float g[RB][GB * OB], u[RB][GB * OB];
      for (int b = b0; b < b1; b++) {
        float gb[RB][OB], ub[RB][OB];
        rows_block(w, b * OB, OB, X, ldx, xp, r0, rt, bf, gb);
        rows_block(w, F + b * OB, OB, X, ldx, xp, r0, rt, bf, ub);
        for (int r = 0; r < rt; r++)
          for (int o = 0; o < OB; o++) { g[r][(b - b0) * OB + o] = gb[r][o]; u[r][(b - b0) * OB + o] = ub[r][o]; }
      }
      for (int r = 0; r < rt; r++) {
        float* a = A + (size_t)(r0 + r) * F + b0 * OB;
        int j = 0;
        for (; j + VW <= n; j += VW) {
          vf gv = ldf(g[r] + j);
          stf(a + j, gv / (exp_v((vf){0} - gv) + 1.f) * ldf(u[r] + j));
        }
        for (; j < n; j++) { /* lane by lane: the same arithmetic as a full vector's */
          vf gv = (vf){0} + g[r][j];
          a[j] = (gv / (exp_v((vf){0} - gv) + 1.f))[0] * u[r][j];
        }
      }
    }
  }
}

/* Llama's RMSNorm in float32: y = (x * rsqrt(mean(x^2) + eps)) * w, for R rows of d. */
static void rmsnorm(const float* X, int R, int d, const float* w, float eps, float* Y) {
  for (int r = 0; r < R; r++) {
    const float* x = X + (size_t)r * d;
    vf acc = (vf){0};
    for (int k = 0; k < d; k += VW) { vf v = ldf(x + k); acc = fmadd(v, v, acc); }
    float inv = 1.f / sqrtf(hsum(acc) / (float)d + eps);
    for (int k = 0; k < d; k++) Y[(size_t)r * d + k] = (x[k] * inv) * w[k];
  }
}

/* RoPE of one head (HF's half-split layout): y = x * cos + rotate_half(x) * sin. */
static void rope(const float* x, const float* cos, const float* sin, int hd, float* y) {
  int half = hd / 2;
  for (int i = 0; i < half; i++) {
    float a = x[i], b = x[i + half];
    y[i] = a * cos[i] - b * sin[i];
    y[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

/* ---- attention over the cache ------------------------------------------------------------- */

#define KC 64 /* cached entries per attention unit */

static inline vf kv_vec(const void* base, size_t at, int bf16) {
  return bf16 ? w_bf16((const uint16_t*)base + at) : ldf((const float*)base + at);
}

/* Entries t0..t1-1 (rows of hd at K, V) for the G query heads of one KV head, q (G, hd). Per head i,
   part[i * (hd + 2)...]: the largest score m, the sum of exp(score - m), and the sum of
   exp(score - m) * v (hd). sc: scratch of G * KC floats. */
static void attend_chunk(const float* q, int G, const void* K, const void* V, int t0, int t1, int hd, int bf,
                         float scale, float* sc, float* part) {
  const int nt = t1 - t0;
  const size_t vrow = (size_t)hd * (bf ? 2 : 4);
  for (int t = 0; t < nt; t++) {
    for (size_t j = 0; j < vrow; j += 64) __builtin_prefetch((const char*)V + (t0 + t) * vrow + j, 0, 3); /* for the sums below */
    for (int i = 0; i < G; i++) { /* two chains of additions per dot product */
      vf a[2] = {(vf){0}, (vf){0}};
      for (int d = 0; d < hd; d += VW) a[(d / VW) & 1] = fmadd(ldf(q + i * hd + d), kv_vec(K, (size_t)(t0 + t) * hd + d, bf), a[(d / VW) & 1]);
      sc[i * KC + t] = hsum(a[0] + a[1]) * scale;
    }
  }
  for (int i = 0; i < G; i++) {
    float* si = sc + i * KC;
    float m = -INFINITY;
    for (int t = 0; t < nt; t++) m = si[t] > m ? si[t] : m;
    for (int t = nt; t < KC; t++) si[t] = -INFINITY; /* whole vectors: exp(-inf - m) -> clamped, then zeroed */
    vf z = (vf){0};
    for (int t = 0; t < KC; t += VW) {
      vf e = exp_v(ldf(si + t) - m);
      for (int j = 0; j < VW; j++) e[j] = t + j < nt ? e[j] : 0.f;
      stf(si + t, e);
      z += e;
    }
    float* pi = part + (size_t)i * (hd + 2);
    pi[0] = m;
    pi[1] = hsum(z);
    for (int d0 = 0; d0 < hd; d0 += 4 * VW) { /* four independent sums of hd's chunks at a time */
      int nv = hd - d0 < 4 * VW ? (hd - d0) / VW : 4;
      vf o[4] = {(vf){0}, (vf){0}, (vf){0}, (vf){0}};
      for (int t = 0; t < nt; t++) {
        vf pt = (vf){0} + si[t];
        for (int c = 0; c < nv; c++) o[c] = fmadd(pt, kv_vec(V, (size_t)(t0 + t) * hd + d0 + c * VW, bf), o[c]);
      }
      for (int c = 0; c < nv; c++) stf(pi + 2 + d0 + c * VW, o[c]);
    }
  }
}

/* ---- checks --------------------------------------------------------------------------------- */

static int weight_ok(const qs_weight* w, int out, int in) {
  if (!w->w || w->out != out || w->in != in || out < 1 || in % CH) return 0;
  if (w->fmt == QS_I8) return w->scale != NULL;
  if (w->fmt == QS_Q4) return w->group == CH;
  return w->fmt == QS_F32 || w->fmt == QS_BF16;
}

int qs_step_check(const qs_shape* s, const qs_layer* L) {
  int H = s->n_heads, Hkv = s->n_kv_heads, hd = s->head_dim, d = s->d;
  if (s->n_layers < 1 || Hkv < 1 || H % Hkv || hd % 16 || hd > 512 || d % 32 || s->d_ff % 32) return QS_ERR_SHAPE;
  for (int l = 0; l < s->n_layers; l++) {
    const qs_layer* y = L + l;
    if (!weight_ok(&y->qkv, (H + 2 * Hkv) * hd, d) || !weight_ok(&y->o, d, H * hd) ||
        !weight_ok(&y->gate_up, 2 * s->d_ff, d) || !weight_ok(&y->down, d, s->d_ff) || !y->attn_norm || !y->mlp_norm)
      return QS_ERR_WEIGHT;
  }
  return 0;
}

/* ---- the step ------------------------------------------------------------------------------- */

/* One decode step of B rows through every layer.
   kc/vc[l]: layer l's pooled key/value buffers (P, Hkv, cap, hd), float32 or (act_bf16) bfloat16;
   pc[l]: its positions (P, cap) int64. Row b lives in pool row slots[b]; at layer l its new entry
   goes to index counts[l * counts_stride + b] (< cap), and it attends over entries 0..that index.
   positions (B,): the rows' true positions, written beside their entries. cos/sin (B, hd) float32:
   the model's rotary tables at those positions. h (B, d): the rows' hidden states (float32 or
   bfloat16), replaced by the last layer's output. With final_norm and head: logits (B, head->out)
   float32 of the final norm and the head. Returns 0, or a negative QS_ERR_* code (nothing written
   for QS_ERR_SHAPE / QS_ERR_WEIGHT / QS_ERR_CACHE). */
#ifdef QS_TIMING
double qs_phase_seconds[8]; /* norm+qkv, attention, merge, o, norm+gate_up, down, head, total */
#define PHASE(i) do { if (tid == 0) { double t_ = omp_get_wtime(); qs_phase_seconds[i] += t_ - t_last; t_last = t_; } } while (0)
#else
#define PHASE(i) do { } while (0)
#endif

/* Bytes of scratch qs_step needs for B rows whose longest cache holds max_count entries before the
   step, with nt threads: its float buffers, then the attention units of every layer (int). */
static size_t scratch_floats(const qs_shape* s, int B, int smax, int nt, size_t* per_thread) {
  const int d = s->d, qd = s->n_heads * s->head_dim, kd = s->n_kv_heads * s->head_dim, F = s->d_ff;
  const int G = s->n_heads / s->n_kv_heads, hd = s->head_dim;
  const size_t kmax = (size_t)(d > qd ? (d > F ? d : F) : (qd > F ? qd : F));
  /* each thread's own: normalized rows, merged attention rows, packed matmul rows, roped q and k, scores */
  *per_thread = (size_t)B * d + (size_t)B * qd + (size_t)B * kmax + (size_t)(G + 1) * hd + (size_t)G * KC;
  return (size_t)B * (d + qd + 2 * kd + F) + (size_t)B * s->n_kv_heads * smax * G * (hd + 2) + nt * *per_thread;
}

static int threads(void) {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

size_t qs_step_scratch_bytes(const qs_shape* s, int B, int max_count) {
  size_t per, smax = (size_t)(max_count < 0 ? 0 : max_count) / KC + 1;
  return sizeof(float) * scratch_floats(s, B, (int)smax, threads(), &per) +
         sizeof(int) * (3 * (size_t)s->n_layers * B * s->n_kv_heads * smax + s->n_layers + 1);
}

/* One decode step of B rows through every layer.
   kc/vc[l]: layer l's pooled key/value buffers (P, Hkv, cap, hd), float32 or (act_bf16) bfloat16;
   pc[l]: its positions (P, cap) int64. Row b lives in pool row slots[b]; at layer l its new entry
   goes to index counts[l * counts_stride + b] (< cap), and it attends over entries 0..that index.
   positions (B,): the rows' true positions, written beside their entries. cos/sin (B, hd) float32:
   the model's rotary tables at those positions. h (B, d): the rows' hidden states (float32 or
   bfloat16), replaced by the last layer's output. With final_norm and head: logits (B, head->out)
   float32 of the final norm and the head. scratch: qs_step_scratch_bytes(...) bytes, or NULL (then
   allocated here). Returns 0, or a negative QS_ERR_* code (nothing written for QS_ERR_SHAPE /
   QS_ERR_WEIGHT / QS_ERR_CACHE). */
int qs_step(const qs_shape* s, const qs_layer* L, void* const* kc, void* const* vc, int64_t* const* pc, int cap,
            int B, const int32_t* slots, const int32_t* counts, int counts_stride, const int64_t* positions,
            const float* cos, const float* sin, void* h, const float* final_norm, const qs_weight* head,
            float* logits, void* scratch, size_t scratch_bytes) {
  int rc = qs_step_check(s, L);
  if (rc) return rc;
  const int nl = s->n_layers, d = s->d, H = s->n_heads, Hkv = s->n_kv_heads, hd = s->head_dim, F = s->d_ff;
  const int G = H / Hkv, qd = H * hd, kd = Hkv * hd, ldq = qd + 2 * kd, bf = s->act_bf16;
  const int dp = QS_DP && bf; /* bfloat16 dot products for the matmuls */
  if (head && (!weight_ok(head, head->out, d) || !final_norm || !logits)) return QS_ERR_WEIGHT;
  if (B < 1) return QS_ERR_SHAPE;
  int maxc = 0;
  for (int l = 0; l < nl; l++)
    for (int b = 0; b < B; b++) {
      int c = counts[l * counts_stride + b];
      if (c < 0 || c >= cap || slots[b] < 0) return QS_ERR_CACHE;
      maxc = c > maxc ? c : maxc;
    }
  const int smax = maxc / KC + 1; /* attention chunks of the longest row */
  const int nt = threads();
  const size_t xlen = (size_t)B * d, plen = (size_t)G * (hd + 2); /* plen: one unit's partial results */
  const size_t kmax = (size_t)(d > qd ? (d > F ? d : F) : (qd > F ? qd : F));
  size_t per, need = qs_step_scratch_bytes(s, B, maxc);
  const size_t nfloat = scratch_floats(s, B, smax, nt, &per);
  void* own = NULL;
  if (!scratch || scratch_bytes < need) {
    own = scratch = malloc(need);
    if (!own) return QS_ERR_MEMORY;
  }
  float* buf = (float*)scratch;
  /* attention units of every layer: (row, KV head, chunk of KC entries), layer l's from ustart[l] */
  int* units = (int*)(buf + nfloat);
  int* ustart = units + 3 * (size_t)nl * B * Hkv * smax;
  ustart[0] = 0;
  for (int l = 0, nu = 0; l < nl; ustart[++l] = nu)
    for (int b = 0; b < B; b++)
      for (int g = 0; g < Hkv; g++)
        for (int c = 0; c <= counts[l * counts_stride + b] / KC; c++, nu++) {
          units[3 * nu] = b; units[3 * nu + 1] = g; units[3 * nu + 2] = c;
        }
  float *h32 = buf, *qkv = h32 + xlen, *act = qkv + (size_t)B * ldq;
  float *parts = act + (size_t)B * F, *priv = parts + (size_t)B * Hkv * smax * plen;
  for (size_t i = 0; i < xlen; i++) h32[i] = bf ? bf2f(((const uint16_t*)h)[i]) : ((const float*)h)[i];
  const size_t row_stride = (size_t)Hkv * cap * hd, head_stride = (size_t)cap * hd, esz = bf ? 2 : 4;

#pragma omp parallel
  {
#ifdef _OPENMP
    int tid = omp_get_thread_num();
#else
    int tid = 0;
#endif
    float* x = priv + (size_t)tid * per; /* normalized rows (B, d) */
    float* att = x + xlen;               /* merged attention rows (B, qd) */
    float* xp = att + (size_t)B * qd;    /* packed matmul rows */
    float* qr = xp + (size_t)B * kmax; /* a unit's roped queries (G, hd), then its key (hd) */
    float* sc = qr + (size_t)(G + 1) * hd;   /* its scores (G, KC) */
#ifdef QS_TIMING
    double t_last = omp_get_wtime(), t_first = t_last;
#endif
    for (int l = 0; l < nl; l++) {
      const qs_layer* y = L + l;
      const int32_t* cnt = counts + (size_t)l * counts_stride;
      rmsnorm(h32, B, d, y->attn_norm, s->eps, x);
      matmul(&y->qkv, x, d, B, qkv, ldq, 0, xp, dp);
      PHASE(0);
      /* the unit holding a row's last entry first writes the step's key (roped) and value there */
#pragma omp for schedule(dynamic, 1)
      for (int u = ustart[l]; u < ustart[l + 1]; u++) {
        int b = units[3 * u], g = units[3 * u + 1], c = units[3 * u + 2], n = cnt[b];
        const float *row = qkv + (size_t)b * ldq, *cb = cos + (size_t)b * hd, *sb = sin + (size_t)b * hd;
        size_t at = (size_t)slots[b] * row_stride + g * head_stride;
        if (c == n / KC) {
          float* kr = qr + (size_t)G * hd;
          rope(row + qd + g * hd, cb, sb, hd, kr);
          const float* v = row + qd + kd + g * hd;
          if (bf) {
            uint16_t *kk = (uint16_t*)kc[l] + at + (size_t)n * hd, *vv = (uint16_t*)vc[l] + at + (size_t)n * hd;
            for (int e = 0; e < hd; e++) { kk[e] = f2bf(kr[e]); vv[e] = f2bf(v[e]); }
          } else {
            memcpy((float*)kc[l] + at + (size_t)n * hd, kr, hd * sizeof(float));
            memcpy((float*)vc[l] + at + (size_t)n * hd, v, hd * sizeof(float));
          }
          if (g == 0) pc[l][(size_t)slots[b] * cap + n] = positions[b];
        }
        for (int i = 0; i < G; i++) rope(row + (g * G + i) * hd, cb, sb, hd, qr + (size_t)i * hd);
        int t0 = c * KC, t1 = (c + 1) * KC < n + 1 ? (c + 1) * KC : n + 1;
        attend_chunk(qr, G, (const char*)kc[l] + at * esz, (const char*)vc[l] + at * esz, t0, t1, hd, bf, s->attn_scale, sc,
                     parts + (((size_t)b * Hkv + g) * smax + c) * plen);
      }
      PHASE(1);
      /* every thread merges the chunks of every head into its own attention rows (a few floats each) */
      for (int b = 0; b < B; b++)
        for (int j = 0; j < H; j++) {
          int g = j / G, i = j % G, S = cnt[b] / KC + 1;
          const float* p0 = parts + ((size_t)b * Hkv + g) * smax * plen + (size_t)i * (hd + 2);
          float m = -INFINITY, z = 0.f, wgt[64];
          for (int c = 0; c < S; c++) m = p0[c * plen] > m ? p0[c * plen] : m;
          float* o = att + (size_t)b * qd + (size_t)j * hd;
          for (int e = 0; e < hd; e++) o[e] = 0.f;
          for (int c0 = 0; c0 < S; c0 += 64) {
            int c1 = S < c0 + 64 ? S : c0 + 64;
            for (int c = c0; c < c1; c++) { wgt[c - c0] = expf(p0[c * plen] - m); z += wgt[c - c0] * p0[c * plen + 1]; }
            for (int c = c0; c < c1; c++)
              for (int e = 0; e < hd; e += VW) stf(o + e, fmadd((vf){0} + wgt[c - c0], ldf(p0 + c * plen + 2 + e), ldf(o + e)));
          }
          for (int e = 0; e < hd; e++) o[e] /= z;
        }
      PHASE(2);
      matmul(&y->o, att, qd, B, h32, d, 1, xp, dp);
      PHASE(3);
      rmsnorm(h32, B, d, y->mlp_norm, s->eps, x);
      gate_up_silu(&y->gate_up, x, d, B, act, F, xp, dp);
      PHASE(4);
      matmul(&y->down, act, F, B, h32, d, 1, xp, dp);
      PHASE(5);
    }
    if (head) {
      rmsnorm(h32, B, d, final_norm, s->eps, x);
      matmul(head, x, d, B, logits, head->out, 0, xp, dp);
    }
    PHASE(6);
#ifdef QS_TIMING
    if (tid == 0) qs_phase_seconds[7] += omp_get_wtime() - t_first;
#endif
  }
  for (size_t i = 0; i < xlen; i++) {
    if (bf) ((uint16_t*)h)[i] = f2bf(h32[i]);
    else ((float*)h)[i] = h32[i];
  }
  free(own);
  return 0;
}

const char* qs_step_isa(void) { return QS_ISA; }
/* 1 when steps with bfloat16 activations run their matmuls as bfloat16 dot products (tile_dp) */
int qs_step_bf16_dot(void) { return QS_DP; }

/* y (R, w->out) float32 = x (R, w->in) float32 @ W^T (+ bias): one linear, as a float32 step runs it. */
int qs_matmul(const qs_weight* w, const float* x, int R, float* y) {
  if (R < 1 || !weight_ok(w, w->out, w->in)) return QS_ERR_WEIGHT;
#ifdef _OPENMP
  int nt = omp_get_max_threads();
#else
  int nt = 1;
#endif
  float* xp = (float*)malloc(sizeof(float) * (size_t)nt * R * w->in);
  if (!xp) return QS_ERR_MEMORY;
#pragma omp parallel
  {
#ifdef _OPENMP
    int tid = omp_get_thread_num();
#else
    int tid = 0;
#endif
    matmul(w, x, w->in, R, y, w->out, 0, xp + (size_t)tid * R * w->in, 0);
  }
  free(xp);
  return 0;
}

/* The step's matmuls alone, as qs_step runs them (same threads, same order), on zero activations
   of B rows: what a step costs without its norms, RoPE, cache writes and attention (benchmarks). */
int qs_step_matmuls(const qs_shape* s, const qs_layer* L, int B, const qs_weight* head) {
  int rc = qs_step_check(s, L);
  if (rc || B < 1) return rc ? rc : QS_ERR_SHAPE;
  const int d = s->d, qd = s->n_heads * s->head_dim, ldq = qd + 2 * s->n_kv_heads * s->head_dim, F = s->d_ff;
  const int dp = QS_DP && s->act_bf16;
#ifdef _OPENMP
  int nt = omp_get_max_threads();
#else
  int nt = 1;
#endif
  size_t kmax = (size_t)(d > qd ? (d > F ? d : F) : (qd > F ? qd : F));
  size_t n = (size_t)B * (2 * d + ldq + qd + F + (head ? head->out : 0) + nt * kmax);
  float* buf = (float*)calloc(n, sizeof(float));
  if (!buf) return QS_ERR_MEMORY;
  float *h32 = buf, *x = h32 + (size_t)B * d, *qkv = x + (size_t)B * d, *att = qkv + (size_t)B * ldq;
  float *act = att + (size_t)B * qd, *logits = act + (size_t)B * F, *xps = logits + (size_t)B * (head ? head->out : 0);
#pragma omp parallel
  {
#ifdef _OPENMP
    float* xp = xps + (size_t)omp_get_thread_num() * B * kmax;
#else
    float* xp = xps;
#endif
    for (int l = 0; l < s->n_layers; l++) {
      matmul(&L[l].qkv, x, d, B, qkv, ldq, 0, xp, dp);
      matmul(&L[l].o, att, qd, B, h32, d, 1, xp, dp);
      gate_up_silu(&L[l].gate_up, x, d, B, act, F, xp, dp);
      matmul(&L[l].down, act, F, B, h32, d, 1, xp, dp);
    }
    if (head) matmul(head, x, d, B, logits, head->out, 0, xp, dp);
  }
  free(buf);
  return 0;
}
