/* QuickSilver native decode matmuls: y = x @ W^T for a few rows of bfloat16 activations. */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QS_AVX512BF16 1
#else
#define QS_AVX512BF16 0
#endif

enum { FMT_BF16 = 0, FMT_I8 = 1, FMT_U4 = 2 };
#define OB 4

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

int qs_features(void) { return QS_AVX512BF16; }

#if QS_AVX512BF16
/* u4 layout: per 64 input channels, 32 bytes; byte j holds channel j (low nibble) and j+32 (high). */
static inline __m512bh w_i8(const int8_t* p) {
  __m256i b = _mm256_loadu_si256((const __m256i*)p);
  __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
  __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
  return _mm512_cvtne2ps_pbh(f1, f0);
}

/* The sums of four vectors at once: [sum a, sum b, sum c, sum d] (a fixed order of additions). */
static inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1));
  __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
  __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1));
  __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* The next o-block of this thread's contiguous share is streamed in while this one computes:
   each step prefetches as many bytes of it as the step reads of this block. */
#define PREFETCH(p, nbytes) \
  for (int j_ = 0; j_ < (nbytes); j_ += 64) _mm_prefetch((const char*)(p) + j_, _MM_HINT_T0)

#define TILE(RT)                                                                                   \
static inline __attribute__((always_inline)) void tile_##RT(int fmt, const uint8_t* W, size_t ldw,   \
    const uint16_t* X, int K, float res[OB][4], __m512i lut, const uint8_t* Wn) {                  \
  __m512 acc[OB][RT];                                                                              \
  for (int o = 0; o < OB; o++) for (int r = 0; r < RT; r++) acc[o][r] = _mm512_setzero_ps();       \
  if (fmt == FMT_U4) {                                                                             \
    for (int k = 0; k < K; k += 64) {                                                              \
      if (Wn) PREFETCH(Wn + (size_t)(k / 2) * OB, OB * 32);                                        \
      __m512i xa[RT], xb[RT];                                                                      \
      for (int r = 0; r < RT; r++) {                                                               \
        xa[r] = _mm512_loadu_si512(X + (size_t)r * K + k);                                         \
        xb[r] = _mm512_loadu_si512(X + (size_t)r * K + k + 32); }                                  \
      for (int o = 0; o < OB; o++) {                                                               \
        __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(W + o * ldw + k / 2))); \
        __m512i lo = _mm512_permutexvar_epi16(_mm512_and_si512(b, _mm512_set1_epi16(15)), lut);   \
        __m512i hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), lut);                      \
        for (int r = 0; r < RT; r++) {                                                             \
          acc[o][r] = _mm512_dpbf16_ps(acc[o][r], (__m512bh)xa[r], (__m512bh)lo);                   \
          acc[o][r] = _mm512_dpbf16_ps(acc[o][r], (__m512bh)xb[r], (__m512bh)hi); } }             \
    }                                                                                              \
  } else if (fmt == FMT_BF16 && RT <= 2) {                                                        \
    /* 1-2 rows of row-major bf16: each output's row read whole (one sequential stream, as the     \
       native step's ROW_BY_ROW), not chunk by chunk across four rows; same sums, same order. */   \
    for (int o = 0; o < OB; o++)                                                                   \
      for (int k = 0; k < K; k += 32) {                                                            \
        __m512bh w = (__m512bh)_mm512_loadu_si512(W + o * ldw + 2 * (size_t)k);                    \
        for (int r = 0; r < RT; r++)                                                               \
          acc[o][r] = _mm512_dpbf16_ps(acc[o][r], (__m512bh)_mm512_loadu_si512(X + (size_t)r * K + k), w); } \
  } else {                                                                                         \
    for (int k = 0; k < K; k += 32) {                                                              \
      if (Wn) {                                                                                    \
        if (fmt == FMT_BF16) PREFETCH(Wn + (size_t)k * 2 * OB, OB * 64);                           \
        else PREFETCH(Wn + (size_t)k * OB, OB * 32); }                                             \
      __m512i xa[RT];                                                                              \
      for (int r = 0; r < RT; r++) xa[r] = _mm512_loadu_si512(X + (size_t)r * K + k);             \
      for (int o = 0; o < OB; o++) {                                                               \
        __m512bh w = fmt == FMT_BF16 ? (__m512bh)_mm512_loadu_si512(W + o * ldw + 2 * (size_t)k)     \
                                     : w_i8((const int8_t*)(W + o * ldw + k));                       \
        for (int r = 0; r < RT; r++) acc[o][r] = _mm512_dpbf16_ps(acc[o][r], (__m512bh)xa[r], w); }  \
    }                                                                                              \
  }                                                                                                \
  for (int r = 0; r < RT; r++) {                                                                   \
    float s4[4];                                                                                   \
    _mm_storeu_ps(s4, hsum4(acc[0][r], acc[1][r], acc[2][r], acc[3][r]));                          \
    for (int o = 0; o < OB; o++) res[o][r] = s4[o]; }                                              \
}
TILE(1) TILE(2) TILE(3) TILE(4)

/* int8 weights for calls of more than 4 rows: two outputs by up to 8 rows per pass, so each
   weight is converted to bfloat16 once and used by every row (16 accumulators in registers). */
#define TILE2(RT)                                                                                  \
static inline __attribute__((always_inline)) void tile2_##RT(const uint8_t* W, size_t ldw,          \
    const uint16_t* X, int K, float res[2][8], const uint8_t* Wn) {                                \
  __m512 acc[2][RT];                                                                               \
  for (int o = 0; o < 2; o++) for (int r = 0; r < RT; r++) acc[o][r] = _mm512_setzero_ps();        \
  for (int k = 0; k < K; k += 32) {                                                                \
    if (Wn) PREFETCH(Wn + (size_t)k * 2, 64);                                                      \
    __m512bh w0 = w_i8((const int8_t*)(W + k)), w1 = w_i8((const int8_t*)(W + ldw + k));            \
    for (int r = 0; r < RT; r++) {                                                                 \
      __m512bh xr = (__m512bh)_mm512_loadu_si512(X + (size_t)r * K + k);                           \
      acc[0][r] = _mm512_dpbf16_ps(acc[0][r], xr, w0);                                             \
      acc[1][r] = _mm512_dpbf16_ps(acc[1][r], xr, w1); }                                           \
  }                                                                                                \
  /* the same additions as tile_* (hsum4), so a row's output does not depend on the call's rows */ \
  for (int r = 0; r < RT; r += 2) {                                                                \
    float s4[4];                                                                                   \
    __m512 z = _mm512_setzero_ps();                                                                \
    _mm_storeu_ps(s4, hsum4(acc[0][r], acc[1][r], r + 1 < RT ? acc[0][r + 1] : z, r + 1 < RT ? acc[1][r + 1] : z)); \
    res[0][r] = s4[0]; res[1][r] = s4[1];                                                          \
    if (r + 1 < RT) { res[0][r + 1] = s4[2]; res[1][r + 1] = s4[3]; } }                            \
}
TILE2(1) TILE2(2) TILE2(3) TILE2(4) TILE2(5) TILE2(6) TILE2(7) TILE2(8)

static void i8_rows(const uint8_t* Wb, size_t ldw, const uint16_t* X, int R, int K, int O, int o0,
                    const float* scale, uint16_t* Y) {
  for (int h = 0; h < OB; h += 2) {
    const uint8_t* W2 = Wb + h * ldw;
    const uint8_t* Wn = W2 + 2 * ldw;
    for (int r0 = 0; r0 < R; r0 += 8) {
      int rt = R - r0 < 8 ? R - r0 : 8;
      float res[2][8];
      const uint16_t* Xr = X + (size_t)r0 * K;
      switch (rt) {
        case 1: tile2_1(W2, ldw, Xr, K, res, Wn); break;
        case 2: tile2_2(W2, ldw, Xr, K, res, Wn); break;
        case 3: tile2_3(W2, ldw, Xr, K, res, Wn); break;
        case 4: tile2_4(W2, ldw, Xr, K, res, Wn); break;
        case 5: tile2_5(W2, ldw, Xr, K, res, Wn); break;
        case 6: tile2_6(W2, ldw, Xr, K, res, Wn); break;
        case 7: tile2_7(W2, ldw, Xr, K, res, Wn); break;
        default: tile2_8(W2, ldw, Xr, K, res, Wn); break;
      }
      for (int o = 0; o < 2; o++) {
        float s = scale ? scale[o0 + h + o] : 1.f;
        for (int r = 0; r < rt; r++) Y[(size_t)(r0 + r) * O + o0 + h + o] = f32_to_bf16(res[o][r] * s);
      }
    }
  }
}

/* The o-block's weights as bfloat16 (OB rows of K), for calls with more rows than one tile:
   each weight is converted once, then every row tile reads the converted block from L1. */
static inline void to_bf16_block(int fmt, const uint8_t* W, size_t ldw, int K, uint16_t* out, __m512i lut) {
  PREFETCH(W + OB * ldw, OB * (int)ldw);
  for (int o = 0; o < OB; o++) {
    uint16_t* dst = out + (size_t)o * K;
    if (fmt == FMT_U4) {
      for (int k = 0; k < K; k += 64) {
        __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(W + o * ldw + k / 2)));
        _mm512_storeu_si512(dst + k, _mm512_permutexvar_epi16(_mm512_and_si512(b, _mm512_set1_epi16(15)), lut));
        _mm512_storeu_si512(dst + k + 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), lut));
      }
    } else {
      for (int k = 0; k < K; k += 32) _mm512_storeu_si512(dst + k, (__m512i)w_i8((const int8_t*)(W + o * ldw + k)));
    }
  }
}
#endif

/* Generic C (any CPU): the same function, vectorized by the compiler as it can. */
static void tile_generic(int fmt, const uint8_t* W, size_t ldw, const uint16_t* X, int K, int rt, float res[OB][4]) {
  float xf[4][64];
  for (int o = 0; o < OB; o++) for (int r = 0; r < rt; r++) res[o][r] = 0.f;
  for (int o = 0; o < OB; o++) {
    const uint8_t* w = W + o * ldw;
    for (int r = 0; r < rt; r++) {
      float part[16] = {0};
      for (int k0 = 0; k0 < K; k0 += 64) {
        for (int j = 0; j < 64; j++) xf[0][j] = bf16_to_f32(X[(size_t)r * K + k0 + j]);
        float wf[64];
        if (fmt == FMT_BF16) { const uint16_t* wb = (const uint16_t*)w; for (int j = 0; j < 64; j++) wf[j] = bf16_to_f32(wb[k0 + j]); }
        else if (fmt == FMT_I8) { const int8_t* wi = (const int8_t*)w; for (int j = 0; j < 64; j++) wf[j] = (float)wi[k0 + j]; }
        else { for (int j = 0; j < 32; j++) { uint8_t b = w[k0 / 2 + j]; wf[j] = (float)(16 * (b & 15) - 120); wf[j + 32] = (float)(16 * (b >> 4) - 120); } }
        for (int j = 0; j < 64; j++) part[j & 15] += xf[0][j] * wf[j];
      }
      float s = 0.f; for (int j = 0; j < 16; j++) s += part[j];
      res[o][r] = s;
    }
  }
}

/* y (R, O) bf16 = x (R, K) bf16 @ W^T, times scale[o] when scale is not NULL. O % 4 == 0, K % 64 == 0. */
int qs_linear(int fmt, const void* Wv, const float* scale, const uint16_t* X, uint16_t* Y, int R, int O, int K, int generic) {
  const uint8_t* W = (const uint8_t*)Wv;
  size_t ldw = fmt == FMT_BF16 ? 2 * (size_t)K : fmt == FMT_I8 ? (size_t)K : (size_t)K / 2;
  if (O % OB || K % 64 || R < 1) return -1;
  int nb = O / OB;
#pragma omp parallel for schedule(static)
  for (int b = 0; b < nb; b++) {
    int o0 = b * OB;
    const uint8_t* Wb = W + (size_t)o0 * ldw;
#if QS_AVX512BF16
    /* bf16 bit patterns of 16 * (u - 8) + 8 for nibbles u = 0..15 */
    static const uint16_t lut16[32] = {0xc2f0,0xc2d0,0xc2b0,0xc290,0xc260,0xc220,0xc1c0,0xc100,
                                       0x4100,0x41c0,0x4220,0x4260,0x4290,0x42b0,0x42d0,0x42f0};
    __m512i lut = _mm512_loadu_si512(lut16);
#endif
#if QS_AVX512BF16
    int tfmt = fmt;
    size_t tld = ldw;
    const uint8_t* Wt = Wb;
    if (!generic && R > 4 && fmt == FMT_I8) {
      i8_rows(Wb, ldw, X, R, K, O, o0, scale, Y);
      continue;
    }
    uint16_t scratch[OB * 4096] __attribute__((aligned(64)));
    if (!generic && R > 4 && fmt != FMT_BF16 && K <= 4096) {
      to_bf16_block(fmt, Wb, ldw, K, scratch, lut);
      tfmt = FMT_BF16; tld = 2 * (size_t)K; Wt = (const uint8_t*)scratch;
    }
    const uint8_t* Wn = Wt == Wb ? Wb + OB * ldw : NULL;
#endif
    for (int r0 = 0; r0 < R; r0 += 4) {
      int rt = R - r0 < 4 ? R - r0 : 4;
      float res[OB][4];
      const uint16_t* Xr = X + (size_t)r0 * K;
#if QS_AVX512BF16
      if (!generic) {
        switch (rt) {
          case 1: tile_1(tfmt, Wt, tld, Xr, K, res, lut, Wn); break;
          case 2: tile_2(tfmt, Wt, tld, Xr, K, res, lut, Wn); break;
          case 3: tile_3(tfmt, Wt, tld, Xr, K, res, lut, Wn); break;
          default: tile_4(tfmt, Wt, tld, Xr, K, res, lut, Wn); break;
        }
      } else
#endif
      tile_generic(fmt, Wb, ldw, Xr, K, rt, res);
      for (int o = 0; o < OB; o++) {
        float s = scale ? scale[o0 + o] : 1.f;
        for (int r = 0; r < rt; r++) Y[(size_t)(r0 + r) * O + o0 + o] = f32_to_bf16(res[o][r] * s);
      }
    }
  }
  return 0;
}

/* Decode attention: one query row per sequence against its cached keys and values (GQA).
   q (B, H, hd) bfloat16, contiguous; keys/values bfloat16 with element strides per sequence
   (ksb, vsb) and per KV head (ksh, vsh), positions hd apart; mask (B, T) float32 additive or
   NULL; out (B, H * hd) bfloat16. Scores, softmax and the weighted sum in float32. */
#include <math.h>
#include <stdlib.h>
int qs_decode_attention(const uint16_t* q, const uint16_t* K, const uint16_t* V, long ksb, long ksh, long vsb,
                        long vsh, const float* mask, uint16_t* out, int B, int H, int Hkv, int T, int hd,
                        float scale) {
  if (H % Hkv || hd > 256 || T < 1) return -1;
  int G = H / Hkv, units = B * Hkv, fail = 0;
#pragma omp parallel
  {
    float* buf = (float*)malloc(sizeof(float) * ((size_t)G * T + (size_t)G * hd * 2));
    if (!buf) {
#pragma omp atomic write
      fail = 1;
    }
#pragma omp for schedule(static)
    for (int u = 0; u < units; u++) {
      if (!buf) continue;
      int b = u / Hkv, g = u % Hkv;
      float* sc = buf;                       /* (G, T) */
      float* qf = buf + (size_t)G * T;       /* (G, hd) */
      float* acc = qf + (size_t)G * hd;      /* (G, hd) */
      for (int i = 0; i < G; i++)
        for (int d = 0; d < hd; d++) qf[i * hd + d] = bf16_to_f32(q[((size_t)b * H + g * G + i) * hd + d]) * scale;
      const uint16_t* Kb = K + b * ksb + g * ksh;
      const uint16_t* Vb = V + b * vsb + g * vsh;
      const float* mb = mask ? mask + (size_t)b * T : NULL;
      for (int t = 0; t < T; t++) {
        const uint16_t* kt = Kb + (size_t)t * hd;
        float kf[256];
        for (int d = 0; d < hd; d++) kf[d] = bf16_to_f32(kt[d]);
        for (int i = 0; i < G; i++) {
          float s = 0.f;
          const float* qi = qf + i * hd;
#pragma omp simd reduction(+ : s)
          for (int d = 0; d < hd; d++) s += qi[d] * kf[d];
          sc[(size_t)i * T + t] = s + (mb ? mb[t] : 0.f);
        }
      }
      for (int i = 0; i < G; i++) {
        float* si = sc + (size_t)i * T;
        float m = -INFINITY, z = 0.f;
        for (int t = 0; t < T; t++) m = si[t] > m ? si[t] : m;
        for (int t = 0; t < T; t++) { si[t] = m == -INFINITY ? 0.f : expf(si[t] - m); z += si[t]; }
        float inv = z > 0.f ? 1.f / z : 0.f;
        for (int t = 0; t < T; t++) si[t] *= inv;
        for (int d = 0; d < hd; d++) acc[i * hd + d] = 0.f;
      }
      for (int t = 0; t < T; t++) {
        const uint16_t* vt = Vb + (size_t)t * hd;
        float vf[256];
        for (int d = 0; d < hd; d++) vf[d] = bf16_to_f32(vt[d]);
        for (int i = 0; i < G; i++) {
          float p = sc[(size_t)i * T + t];
          float* ai = acc + i * hd;
#pragma omp simd
          for (int d = 0; d < hd; d++) ai[d] += p * vf[d];
        }
      }
      for (int i = 0; i < G; i++)
        for (int d = 0; d < hd; d++) out[((size_t)b * H + g * G + i) * hd + d] = f32_to_bf16(acc[i * hd + d]);
    }
    free(buf);
  }
  return fail ? -2 : 0;
}

/* Causal prefill attention (flash style): queries and keys are the same sequence, query i sees
   keys 0..i. q (T, H, 64), k/v (T, Hkv, 64) bfloat16, contiguous; out (T, H * 64) bfloat16.
   Scores and softmax in float32 (online, per block of 64 keys); probabilities rounded to
   bfloat16 for the weighted sum of values, accumulated in float32. Head dim 64 only. */
#if QS_AVX512BF16
static inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

#define QT 4
#define KB 64 /* keys per block: 4 vectors of 16 scores per query row */
static void flash_tile(const uint16_t* q, int H, int h, int i0, int qt, const uint16_t* Kp, const uint16_t* Vp,
                       float scale, uint16_t* out) {
  uint32_t qp[QT][32];
  for (int r = 0; r < QT; r++)
    for (int p = 0; p < 32; p++) qp[r][p] = r < qt ? ((const uint32_t*)(q + ((size_t)(i0 + r) * H + h) * 64))[p] : 0;
  __m512 O[QT][4];
  float m[QT], l[QT];
  for (int r = 0; r < QT; r++) { m[r] = -INFINITY; l[r] = 0.f; for (int d = 0; d < 4; d++) O[r][d] = _mm512_setzero_ps(); }
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 ninf = _mm512_set1_ps(-INFINITY), sc = _mm512_set1_ps(scale);
  int last = i0 + qt - 1;
  for (int jb = 0; jb * KB <= last; jb++) {
    __m512 s[QT][4];
    for (int r = 0; r < QT; r++) for (int c = 0; c < 4; c++) s[r][c] = _mm512_setzero_ps();
    const uint16_t* kp = Kp + (size_t)(jb * 4) * 32 * 32;
    for (int p = 0; p < 32; p++) {
      __m512bh k[4];
      for (int c = 0; c < 4; c++) k[c] = (__m512bh)_mm512_loadu_si512(kp + (c * 32 + p) * 32);
      for (int r = 0; r < QT; r++) {
        __m512bh qb = (__m512bh)_mm512_set1_epi32((int)qp[r][p]);
        for (int c = 0; c < 4; c++) s[r][c] = _mm512_dpbf16_ps(s[r][c], qb, k[c]);
      }
    }
    uint32_t pb[QT][32];
    int diag = jb * KB + KB - 1 > i0; /* only blocks that reach past the first query row need masks */
    for (int r = 0; r < QT; r++) {
      if (r >= qt) { for (int j = 0; j < 32; j++) pb[r][j] = 0; continue; }
      __mmask16 v[4] = {0xffff, 0xffff, 0xffff, 0xffff};
      __m512 S[4];
      __m512 mx = ninf;
      for (int c = 0; c < 4; c++) {
        S[c] = _mm512_mul_ps(s[r][c], sc);
        if (diag) v[c] = _mm512_cmple_epi32_mask(_mm512_add_epi32(iota, _mm512_set1_epi32(16 * c)), _mm512_set1_epi32(i0 + r - jb * KB));
        mx = _mm512_max_ps(mx, _mm512_mask_mov_ps(ninf, v[c], S[c]));
      }
      float bm = _mm512_reduce_max_ps(mx);
      float mn = bm > m[r] ? bm : m[r];
      __m512 mv = _mm512_set1_ps(mn), P[4], ps = _mm512_setzero_ps();
      for (int c = 0; c < 4; c++) { P[c] = _mm512_maskz_mov_ps(v[c], exp512(_mm512_sub_ps(S[c], mv))); ps = _mm512_add_ps(ps, P[c]); }
      if (mn != m[r]) { /* the running maximum moved: rescale what was accumulated */
        float corr = m[r] == -INFINITY ? 0.f : expf(m[r] - mn);
        __m512 cv = _mm512_set1_ps(corr);
        l[r] *= corr;
        for (int d = 0; d < 4; d++) O[r][d] = _mm512_mul_ps(O[r][d], cv);
        m[r] = mn;
      }
      l[r] += _mm512_reduce_add_ps(ps);
      _mm512_storeu_si512(pb[r], (__m512i)_mm512_cvtne2ps_pbh(P[1], P[0]));
      _mm512_storeu_si512(pb[r] + 16, (__m512i)_mm512_cvtne2ps_pbh(P[3], P[2]));
    }
    const uint16_t* vb = Vp + (size_t)jb * 32 * 4 * 32;
    for (int jp = 0; jp < 32; jp++) {
      __m512bh vv[4];
      for (int d = 0; d < 4; d++) vv[d] = (__m512bh)_mm512_loadu_si512(vb + (jp * 4 + d) * 32);
      for (int r = 0; r < QT; r++) {
        __m512bh pr = (__m512bh)_mm512_set1_epi32((int)pb[r][jp]);
        for (int d = 0; d < 4; d++) O[r][d] = _mm512_dpbf16_ps(O[r][d], pr, vv[d]);
      }
    }
  }
  for (int r = 0; r < qt; r++) {
    __m512 inv = _mm512_set1_ps(1.f / l[r]);
    uint16_t* o = out + ((size_t)(i0 + r) * H + h) * 64;
    for (int d = 0; d < 4; d++) _mm256_storeu_si256((__m256i*)(o + d * 16), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(O[r][d], inv)));
  }
}
#endif

int qs_causal_attention(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, int T, int H, int Hkv,
                        int hd, float scale) {
#if QS_AVX512BF16
  if (hd != 64 || H % Hkv || T < 1) return -1;
  int Tpad = (T + KB - 1) / KB * KB, G = H / Hkv;
  uint16_t* Kp = (uint16_t*)aligned_alloc(64, (size_t)Hkv * Tpad * 64 * 2);
  uint16_t* Vp = (uint16_t*)aligned_alloc(64, (size_t)Hkv * Tpad * 64 * 2);
  if (!Kp || !Vp) { free(Kp); free(Vp); return -2; }
  /* Keys as [T/16][32 dim pairs][16 keys][2]; values as [T/2][4 dim blocks][16 dims][2 keys]. */
#pragma omp parallel for schedule(static)
  for (int gt = 0; gt < Hkv * (Tpad / 16); gt++) {
    int g = gt / (Tpad / 16), tb = gt % (Tpad / 16);
    uint16_t* kd = Kp + (size_t)g * Tpad * 64 + (size_t)tb * 16 * 64;
    uint16_t* vd = Vp + (size_t)g * Tpad * 64 + (size_t)tb * 16 * 64;
    for (int jj = 0; jj < 16; jj++) {
      int t = tb * 16 + jj;
      const uint16_t* ks = k + ((size_t)t * Hkv + g) * 64;
      const uint16_t* vs = v + ((size_t)t * Hkv + g) * 64;
      for (int p = 0; p < 32; p++) {
        kd[(p * 16 + jj) * 2] = t < T ? ks[2 * p] : 0;
        kd[(p * 16 + jj) * 2 + 1] = t < T ? ks[2 * p + 1] : 0;
      }
      int tp = jj / 2, odd = jj % 2;
      for (int d = 0; d < 64; d++) vd[(tp * 4 + d / 16) * 32 + (d % 16) * 2 + odd] = t < T ? vs[d] : 0;
    }
  }
  int tiles = (T + QT - 1) / QT;
#pragma omp parallel for schedule(dynamic, 8)
  for (int it = 0; it < H * tiles; it++) {
    int tile = tiles - 1 - it / H, h = it % H; /* the longest rows first */
    int i0 = tile * QT, qt = T - i0 < QT ? T - i0 : QT;
    int g = h / G;
    flash_tile(q, H, h, i0, qt, Kp + (size_t)g * Tpad * 64, Vp + (size_t)g * Tpad * 64, scale, out);
  }
  free(Kp); free(Vp);
  return 0;
#else
  (void)q; (void)k; (void)v; (void)out; (void)T; (void)H; (void)Hkv; (void)hd; (void)scale;
  return -1;
#endif
}
