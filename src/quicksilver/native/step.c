/* QuickSilver native decode step: every op of a Llama-family decode step in one C call.

   For B rows, each the next token of one sequence whose cache is a row of a pooled,
   head-major K/V buffer, and for every layer:
     x = RMSNorm(h); qkv = x @ Wqkv^T; RoPE(q, k) with the caller's cos/sin tables;
     k, v -> the row's cache at index count; attention of each query head over entries
     [0, count] of its row (GQA); h += att @ Wo^T; x = RMSNorm(h);
     a = SiLU(x @ Wgate^T) * (x @ Wup^T); h += a @ Wdown^T;
   then, optionally, the final RMSNorm and the LM head (logits in float32).

   Arithmetic is float32 throughout (the residual stream too); with bfloat16 activations only
   the cache entries and the step's input/output rows are bfloat16. Weights: float32,
   bfloat16, int8 with one scale per output channel, or group-wise asymmetric 4-bit (GGUF
   Q4_1's layout: per group a float16 scale d and minimum m, w = d * q + m, q in 0..15; per
   32 weights 16 bytes, byte j holding weight j in its low nibble and weight j + 16 in its
   high nibble).

   One OpenMP parallel region per step; the matmuls split output channels over the threads,
   attention splits (row, head) pairs. Each output element is one dot product in a fixed order
   (vector lanes over the input channels, then the lanes summed), so a row's result does not
   depend on the other rows of the call or on the thread count.

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
typedef uint16_t vh __attribute__((vector_size(2 * VW)));
typedef uint8_t vb __attribute__((vector_size(VW)));

enum { QS_F32 = 0, QS_BF16 = 1, QS_I8 = 2, QS_Q4 = 3 };
enum { QS_ERR_SHAPE = -1, QS_ERR_WEIGHT = -2, QS_ERR_CACHE = -3, QS_ERR_MEMORY = -4 };

typedef struct {
  int32_t fmt, out, in, group; /* group: inputs per (scale, min) of QS_Q4 */
  const void* w;               /* (out, in) float32 | bfloat16 bits | int8; QS_Q4: (out, in / 2) nibbles */
  const float* scale;          /* QS_I8: (out,) */
  const uint16_t* sm;          /* QS_Q4: float16 bits (out, in / group, 2): scale, minimum */
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
typedef int32_t vi __attribute__((vector_size(4 * VW)));
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
static inline float hsum(vf v) { float s = 0.f; for (int i = 0; i < VW; i++) s += v[i]; return s; }

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
const char* qs_step_isa(void) { return QS_ISA; }

/* ---- matmuls: y = x @ W^T for a few rows ------------------------------------------------- */

#define OB 4 /* output channels per block: the unit the threads share out */
#define RB 8 /* rows per tile, at most */

/* Outputs o0..o0+ot-1 of w for rows 0..rt-1 of X (row stride ldx) -> res[r][o], the bias and the
   int8 scale applied; ot * rt vector accumulators (ot, rt: constants after inlining). Each
   accumulator sees the inputs in ascending order, VW lanes at a time, whatever the tile's shape,
   so a row's result does not depend on how many rows the call has. */
static inline __attribute__((always_inline)) void tile(const qs_weight* w, int o0, const int ot, const float* X,
                                                       size_t ldx, const int rt, float res[RB][OB]) {
  const int K = w->in;
  vf acc[OB][RB];
  for (int o = 0; o < ot; o++) for (int r = 0; r < rt; r++) acc[o][r] = (vf){0};
  if (w->fmt == QS_F32) {
    const float* W = (const float*)w->w + (size_t)o0 * K;
    for (int k = 0; k < K; k += VW)
      for (int o = 0; o < ot; o++) {
        vf wv = ldf(W + (size_t)o * K + k);
        for (int r = 0; r < rt; r++) acc[o][r] = fmadd(wv, ldf(X + r * ldx + k), acc[o][r]);
      }
  } else if (w->fmt == QS_BF16) {
    const uint16_t* W = (const uint16_t*)w->w + (size_t)o0 * K;
    for (int k = 0; k < K; k += VW)
      for (int o = 0; o < ot; o++) {
        vf wv = w_bf16(W + (size_t)o * K + k);
        for (int r = 0; r < rt; r++) acc[o][r] = fmadd(wv, ldf(X + r * ldx + k), acc[o][r]);
      }
  } else if (w->fmt == QS_I8) {
    const int8_t* W = (const int8_t*)w->w + (size_t)o0 * K;
    for (int k = 0; k < K; k += VW)
      for (int o = 0; o < ot; o++) {
        vf wv = w_i8(W + (size_t)o * K + k);
        for (int r = 0; r < rt; r++) acc[o][r] = fmadd(wv, ldf(X + r * ldx + k), acc[o][r]);
      }
  } else { /* QS_Q4 */
    const int G = w->group, ng = K / G;
    const uint8_t* Q = (const uint8_t*)w->w + (size_t)o0 * (K / 2);
    const uint16_t* SM = w->sm + (size_t)o0 * ng * 2;
    for (int g = 0; g < ng; g++) {
      vf dv[OB], mv[OB];
      for (int o = 0; o < ot; o++) {
        dv[o] = (vf){0} + h2f(SM[((size_t)o * ng + g) * 2]);
        mv[o] = (vf){0} + h2f(SM[((size_t)o * ng + g) * 2 + 1]);
      }
      for (int k0 = g * G; k0 < (g + 1) * G; k0 += 32)
        for (int c = 0; c < 32; c += VW) /* weights k0+c..: low nibbles of bytes c.., then high nibbles of bytes c-16.. */
          for (int o = 0; o < ot; o++) {
            const uint8_t* qb = Q + (size_t)o * (K / 2) + k0 / 2 + (c & 15);
            vf wv = fmadd(dv[o], c < 16 ? w_lo(qb) : w_hi(qb), mv[o]);
            for (int r = 0; r < rt; r++) acc[o][r] = fmadd(wv, ldf(X + r * ldx + k0 + c), acc[o][r]);
          }
    }
  }
  for (int o = 0; o < ot; o++) {
    float s = w->fmt == QS_I8 ? w->scale[o0 + o] : 1.f, b = w->bias ? w->bias[o0 + o] : 0.f;
    for (int r = 0; r < rt; r++) res[r][o] = (w->fmt == QS_I8 ? hsum(acc[o][r]) * s : hsum(acc[o][r])) + b;
  }
}

/* Outputs o0..o0+no-1 (no <= OB) for rt <= RB rows: one or two rows as 4 outputs x rows (four
   or eight independent accumulators while the weights stream from memory); more rows one
   output at a time over all of them, so each weight is converted once per tile of rows. */
static void block(const qs_weight* w, int o0, int no, const float* X, size_t ldx, int rt, float res[RB][OB]) {
  if (no == OB && rt == 1) { tile(w, o0, OB, X, ldx, 1, res); return; }
  if (no == OB && rt == 2) { tile(w, o0, OB, X, ldx, 2, res); return; }
  for (int o = 0; o < no; o++) {
    float one[RB][OB];
    switch (rt) {
      case 1: tile(w, o0 + o, 1, X, ldx, 1, one); break;
      case 2: tile(w, o0 + o, 1, X, ldx, 2, one); break;
      case 3: tile(w, o0 + o, 1, X, ldx, 3, one); break;
      case 4: tile(w, o0 + o, 1, X, ldx, 4, one); break;
      case 5: tile(w, o0 + o, 1, X, ldx, 5, one); break;
      case 6: tile(w, o0 + o, 1, X, ldx, 6, one); break;
      case 7: tile(w, o0 + o, 1, X, ldx, 7, one); break;
      default: tile(w, o0 + o, 1, X, ldx, 8, one); break;
    }
    for (int r = 0; r < rt; r++) res[r][o] = one[r][0];
  }
}

/* Y[r][o] (=, or += with add) over every output channel; called inside a parallel region. */
static void matmul(const qs_weight* w, const float* X, size_t ldx, int R, float* Y, size_t ldy, int add) {
#pragma omp for schedule(static)
  for (int b = 0; b < (w->out + OB - 1) / OB; b++) {
    int o0 = b * OB, no = w->out - o0 < OB ? w->out - o0 : OB;
    for (int r0 = 0; r0 < R; r0 += RB) {
      int rt = R - r0 < RB ? R - r0 : RB;
      float res[RB][OB];
      block(w, o0, no, X + (size_t)r0 * ldx, ldx, rt, res);
      for (int r = 0; r < rt; r++)
        for (int o = 0; o < no; o++) {
          float* y = Y + (size_t)(r0 + r) * ldy + o0 + o;
          *y = add ? *y + res[r][o] : res[r][o];
        }
    }
  }
}

static inline float silu(float g) { return g / (1.f + expf(-g)); }

/* A[r][j] = SiLU(gate_j . x_r) * (up_j . x_r), j < F: gate rows 0..F-1, up rows F..2F-1 of w. */
static void gate_up_silu(const qs_weight* w, const float* X, size_t ldx, int R, float* A, int F) {
#pragma omp for schedule(static)
  for (int b = 0; b < F / OB; b++) {
    int o0 = b * OB;
    for (int r0 = 0; r0 < R; r0 += RB) {
      int rt = R - r0 < RB ? R - r0 : RB;
      float g[RB][OB], u[RB][OB];
      block(w, o0, OB, X + (size_t)r0 * ldx, ldx, rt, g);
      block(w, F + o0, OB, X + (size_t)r0 * ldx, ldx, rt, u);
      for (int r = 0; r < rt; r++)
        for (int o = 0; o < OB; o++) A[(size_t)(r0 + r) * F + o0 + o] = silu(g[r][o]) * u[r][o];
    }
  }
}

/* ---- pointwise --------------------------------------------------------------------------- */

/* Llama's RMSNorm in float32: y = (x * rsqrt(mean(x^2) + eps)) * w, for R rows of d. */
static void rmsnorm(const float* X, int R, int d, const float* w, float eps, float* Y) {
  for (int r = 0; r < R; r++) {
    const float* x = X + (size_t)r * d;
    vf acc = (vf){0};
    int k = 0;
    for (; k + VW <= d; k += VW) { vf v = ldf(x + k); acc = fmadd(v, v, acc); }
    float ss = hsum(acc);
    for (; k < d; k++) ss += x[k] * x[k];
    float inv = 1.f / sqrtf(ss / (float)d + eps);
    for (k = 0; k < d; k++) Y[(size_t)r * d + k] = (x[k] * inv) * w[k];
  }
}

/* RoPE in place on one head (HF's half-split layout): x * cos + rotate_half(x) * sin. */
static void rope(float* x, const float* cos, const float* sin, int hd) {
  int half = hd / 2;
  for (int i = 0; i < half; i++) {
    float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

/* ---- attention over the cache ------------------------------------------------------------- */

static inline vf kv_vec(const void* base, size_t at, int bf16) {
  return bf16 ? w_bf16((const uint16_t*)base + at) : ldf((const float*)base + at);
}

/* One query head q (hd) over n cached entries of one KV head (rows of hd at K, V). */
static void attend_head(const float* q, const void* K, const void* V, int n, int hd, int bf16, float scale,
                        float* sc, float* out) {
  float m = -INFINITY;
  for (int t = 0; t < n; t++) {
    vf acc = (vf){0};
    int d = 0;
    for (; d + VW <= hd; d += VW) acc = fmadd(ldf(q + d), kv_vec(K, (size_t)t * hd + d, bf16), acc);
    float s = hsum(acc);
    for (; d < hd; d++) s += q[d] * (bf16 ? bf2f(((const uint16_t*)K)[(size_t)t * hd + d]) : ((const float*)K)[(size_t)t * hd + d]);
    sc[t] = s * scale;
    m = sc[t] > m ? sc[t] : m;
  }
  float z = 0.f;
  for (int t = 0; t < n; t++) { sc[t] = expf(sc[t] - m); z += sc[t]; }
  float inv = 1.f / z;
  for (int d = 0; d < hd; d++) out[d] = 0.f;
  for (int t = 0; t < n; t++) {
    float p = sc[t] * inv;
    int d = 0;
    for (; d + VW <= hd; d += VW) stf(out + d, fmadd((vf){0} + p, kv_vec(V, (size_t)t * hd + d, bf16), ldf(out + d)));
    for (; d < hd; d++) out[d] += p * (bf16 ? bf2f(((const uint16_t*)V)[(size_t)t * hd + d]) : ((const float*)V)[(size_t)t * hd + d]);
  }
}

/* ---- checks --------------------------------------------------------------------------------- */

static int weight_ok(const qs_weight* w, int out, int in) {
  if (!w->w || w->out != out || w->in != in || out < 1 || in % 32) return 0;
  if (w->fmt == QS_I8) return w->scale != NULL;
  if (w->fmt == QS_Q4) return w->sm && w->group > 0 && w->group % 32 == 0 && in % w->group == 0;
  return w->fmt == QS_F32 || w->fmt == QS_BF16;
}

int qs_step_check(const qs_shape* s, const qs_layer* L) {
  int H = s->n_heads, Hkv = s->n_kv_heads, hd = s->head_dim, d = s->d;
  if (s->n_layers < 1 || Hkv < 1 || H % Hkv || hd % 2 || hd > 1024 || d % 32 || s->d_ff % 32) return QS_ERR_SHAPE;
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
int qs_step(const qs_shape* s, const qs_layer* L, void* const* kc, void* const* vc, int64_t* const* pc, int cap,
            int B, const int32_t* slots, const int32_t* counts, int counts_stride, const int64_t* positions,
            const float* cos, const float* sin, void* h, const float* final_norm, const qs_weight* head,
            float* logits) {
  int rc = qs_step_check(s, L);
  if (rc) return rc;
  const int nl = s->n_layers, d = s->d, H = s->n_heads, Hkv = s->n_kv_heads, hd = s->head_dim, F = s->d_ff;
  const int G = H / Hkv, qd = H * hd, kd = Hkv * hd, ldq = qd + 2 * kd, bf = s->act_bf16;
  if (head && (!weight_ok(head, head->out, d) || !final_norm || !logits)) return QS_ERR_WEIGHT;
  if (B < 1) return QS_ERR_SHAPE;
  int nmax = 0;
  for (int l = 0; l < nl; l++)
    for (int b = 0; b < B; b++) {
      int c = counts[l * counts_stride + b];
      if (c < 0 || c >= cap || slots[b] < 0) return QS_ERR_CACHE;
      nmax = c + 1 > nmax ? c + 1 : nmax;
    }
#ifdef _OPENMP
  int nt = omp_get_max_threads();
#else
  int nt = 1;
#endif
  size_t xlen = (size_t)B * d;
  float* buf = (float*)malloc(sizeof(float) * ((size_t)B * (d + ldq + qd + F) + nt * (xlen + nmax)));
  if (!buf) return QS_ERR_MEMORY;
  float *h32 = buf, *qkv = h32 + xlen, *att = qkv + (size_t)B * ldq, *act = att + (size_t)B * qd, *priv = act + (size_t)B * F;
  for (size_t i = 0; i < xlen; i++) h32[i] = bf ? bf2f(((const uint16_t*)h)[i]) : ((const float*)h)[i];
  const size_t row_stride = (size_t)Hkv * cap * hd, head_stride = (size_t)cap * hd, esz = bf ? 2 : 4;

#pragma omp parallel
  {
#ifdef _OPENMP
    int tid = omp_get_thread_num();
#else
    int tid = 0;
#endif
    float* x = priv + (size_t)tid * (xlen + nmax); /* this thread's copy of the normalized rows */
    float* sc = x + xlen;                          /* its attention scores */
    for (int l = 0; l < nl; l++) {
      const qs_layer* y = L + l;
      const int32_t* cnt = counts + (size_t)l * counts_stride;
      rmsnorm(h32, B, d, y->attn_norm, s->eps, x);
      matmul(&y->qkv, x, d, B, qkv, ldq, 0);
      /* RoPE on every q and k head; k and v into the cache */
#pragma omp for schedule(static)
      for (int u = 0; u < B * (H + Hkv); u++) {
        int b = u / (H + Hkv), j = u % (H + Hkv);
        float* row = qkv + (size_t)b * ldq;
        if (j < H) { rope(row + j * hd, cos + (size_t)b * hd, sin + (size_t)b * hd, hd); continue; }
        int g = j - H, n = cnt[b];
        float *k = row + qd + g * hd, *v = row + qd + kd + g * hd;
        rope(k, cos + (size_t)b * hd, sin + (size_t)b * hd, hd);
        size_t at = (size_t)slots[b] * row_stride + g * head_stride + (size_t)n * hd;
        if (bf) {
          uint16_t *kk = (uint16_t*)kc[l] + at, *vv = (uint16_t*)vc[l] + at;
          for (int e = 0; e < hd; e++) { kk[e] = f2bf(k[e]); vv[e] = f2bf(v[e]); }
        } else {
          memcpy((float*)kc[l] + at, k, hd * sizeof(float));
          memcpy((float*)vc[l] + at, v, hd * sizeof(float));
        }
        if (g == 0) pc[l][(size_t)slots[b] * cap + n] = positions[b];
      }
#pragma omp for schedule(dynamic, 1)
      for (int u = 0; u < B * H; u++) {
        int b = u / H, j = u % H;
        size_t at = ((size_t)slots[b] * row_stride + (size_t)(j / G) * head_stride) * esz;
        attend_head(qkv + (size_t)b * ldq + j * hd, (const char*)kc[l] + at, (const char*)vc[l] + at, cnt[b] + 1, hd, bf,
                    s->attn_scale, sc, att + (size_t)b * qd + j * hd);
      }
      matmul(&y->o, att, qd, B, h32, d, 1);
      rmsnorm(h32, B, d, y->mlp_norm, s->eps, x);
      gate_up_silu(&y->gate_up, x, d, B, act, F);
      matmul(&y->down, act, F, B, h32, d, 1);
    }
    if (head) {
      rmsnorm(h32, B, d, final_norm, s->eps, x);
      matmul(head, x, d, B, logits, head->out, 0);
    }
  }
  for (size_t i = 0; i < xlen; i++) {
    if (bf) ((uint16_t*)h)[i] = f2bf(h32[i]);
    else ((float*)h)[i] = h32[i];
  }
  free(buf);
  return 0;
}

/* y (R, w->out) float32 = x (R, w->in) float32 @ W^T (+ bias): one linear, as the step runs it. */
int qs_matmul(const qs_weight* w, const float* x, int R, float* y) {
  if (R < 1 || !weight_ok(w, w->out, w->in)) return QS_ERR_WEIGHT;
#pragma omp parallel
  matmul(w, x, w->in, R, y, w->out, 0);
  return 0;
}

/* The step's matmuls alone, as qs_step runs them (same threads, same order), on zero activations
   of B rows: what a step costs without its norms, RoPE, cache writes and attention (benchmarks). */
int qs_step_matmuls(const qs_shape* s, const qs_layer* L, int B, const qs_weight* head) {
  int rc = qs_step_check(s, L);
  if (rc || B < 1) return rc ? rc : QS_ERR_SHAPE;
  const int d = s->d, qd = s->n_heads * s->head_dim, ldq = qd + 2 * s->n_kv_heads * s->head_dim, F = s->d_ff;
  size_t n = (size_t)B * (2 * d + ldq + qd + F + (head ? head->out : 0));
  float* buf = (float*)calloc(n, sizeof(float));
  if (!buf) return QS_ERR_MEMORY;
  float *h32 = buf, *x = h32 + (size_t)B * d, *qkv = x + (size_t)B * d, *att = qkv + (size_t)B * ldq;
  float *act = att + (size_t)B * qd, *logits = act + (size_t)B * F;
#pragma omp parallel
  {
    for (int l = 0; l < s->n_layers; l++) {
      matmul(&L[l].qkv, x, d, B, qkv, ldq, 0);
      matmul(&L[l].o, att, qd, B, h32, d, 1);
      gate_up_silu(&L[l].gate_up, x, d, B, act, F);
      matmul(&L[l].down, act, F, B, h32, d, 1);
    }
    if (head) matmul(head, x, d, B, logits, head->out, 0);
  }
  free(buf);
  return 0;
}
