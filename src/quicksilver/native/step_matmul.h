/* QuickSilver native decode step: its matmuls, y = x @ W^T for a few rows, in every weight format.

   Part of step.c, which includes it once after its vector helpers (vf, ldf, fmadd, hsum, w_bf16,
   w_i8, w_lo, w_hi, h2f): not a header of its own. Kept apart to keep each file readable; the
   native build's hash covers it (native._library_path reads the files a source includes). */

/* ---- matmuls: y = x @ W^T for a few rows ------------------------------------------------- */

#define OB 4  /* rows per interleaved block; output channels per tile for one or two rows */
#define CH 32 /* weights per chunk, the unit of the layouts */
#define RB 8  /* rows per tile, at most */
#ifndef GB
#define GB 64 /* blocks of OB outputs a thread takes at a time, at most (see grab) */
#endif

/* Where row o's chunks of CH weights lie: its first chunk, and *cs the bytes from one chunk to the
   next. float32 and bfloat16 weights are row-major (the model's own tensors). int8 and 4-bit ones
   are copies made for these kernels: full blocks of OB rows with their chunks interleaved (chunk c
   of rows o..o+3, then chunk c + 1 of them, ...), then the last out % OB rows row-major, so that a
   thread's share of a weight is one sequential stream. A 4-bit chunk is GGUF's block_q4_1: float16
   scale d, float16 minimum m, 16 bytes of codes (byte j: weight j low nibble, weight j + 16 high). */
static inline const uint8_t* row_at(const qs_weight* w, int o, size_t* cs) {
  const int K = w->in;
  if (w->fmt == QS_F32) { *cs = CH * 4; return (const uint8_t*)w->w + (size_t)o * K * 4; }
  if (w->fmt == QS_BF16) { *cs = CH * 2; return (const uint8_t*)w->w + (size_t)o * K * 2; }
  const size_t cb = w->fmt == QS_I8 ? CH : CH / 2 + 4, row = (size_t)(K / CH) * cb;
  const int full = w->out / OB * OB;
  if (o < full) { *cs = OB * cb; return (const uint8_t*)w->w + (size_t)(o / OB) * OB * row + (size_t)(o % OB) * cb; }
  *cs = cb;
  return (const uint8_t*)w->w + (size_t)o * row;
}

static inline float h2f_at(const uint8_t* p) { uint16_t h; memcpy(&h, p, 2); return h2f(h); }

/* Row-major weights (float32, bfloat16) at one or two rows of X are read output by output, each
   output's row whole: the OB rows of a block lie back to back, so a thread's share is one sequential
   stream, as the interleaved copies of int8 and 4-bit weights are. Chunk by chunk over the OB rows
   (four streams a row apart, restarting every block) read bfloat16 weights at 2/3 of that rate: the
   whole step's matmuls 14.1 against 9.6 ms at one row (SmolLM2-135M, 2 threads, AVX-512 BF16).
   Each output still sums its chunks in ascending order, so the results are the same either way.
   With more rows the chunk-by-chunk order shares each row's load among outputs, and is faster (float32
   weights; bfloat16 dot products read row by row at every row count: tile_dp). */
#ifndef ROW_BY_ROW
#define ROW_BY_ROW(rt) ((rt) <= 2)
#endif

/* Outputs o0..o0+ot-1 of w for rows 0..rt-1 of X -> res[r][o], the bias and the
   int8 scale applied; ot * rt vector accumulators (ot, rt: constants after inlining). Each
   accumulator sees the inputs in ascending order, VW lanes at a time, whatever the tile's shape,
   so a row's result does not depend on how many rows the call has. */
static inline __attribute__((always_inline)) void tile(const qs_weight* w, int o0, const int ot, const float* X,
                                                       size_t ldx, size_t xcs, const int rt, float res[RB][OB]) {
  /* x of row r, inputs c * CH + k: X[c * xcs + r * ldx + k] (row-major: xcs = CH, ldx = in;
     packed by pack_rows: ldx = CH, xcs = rt * CH, constants, so no register holds a row's address) */
  const int nc = w->in / CH;
  const uint8_t* p[OB];
  size_t cs[OB];
  vf acc[OB][RB];
  for (int o = 0; o < ot; o++) {
    p[o] = row_at(w, o0 + o, &cs[o]);
    for (int r = 0; r < rt; r++) acc[o][r] = (vf){0};
  }
  /* one loop per format (a branch inside the loop let the compiler hoist every row's loads above it) */
#define ROWS_FMA(wv, k) for (int r = 0; r < rt; r++) acc[o][r] = fmadd(wv, ldf(xc + r * ldx + (k)), acc[o][r])
  if (w->fmt == QS_F32 && ROW_BY_ROW(rt)) {
    for (int o = 0; o < ot; o++)
      for (int c = 0; c < nc; c++) {
        const float* xc = X + c * xcs;
        for (int k = 0; k < CH; k += VW) { vf wv = ldf((const float*)(p[o] + c * cs[o]) + k); ROWS_FMA(wv, k); }
      }
  } else if (w->fmt == QS_BF16 && ROW_BY_ROW(rt)) {
    for (int o = 0; o < ot; o++)
      for (int c = 0; c < nc; c++) {
        const float* xc = X + c * xcs;
        for (int k = 0; k < CH; k += VW) { vf wv = w_bf16((const uint16_t*)(p[o] + c * cs[o]) + k); ROWS_FMA(wv, k); }
      }
  } else if (w->fmt == QS_F32) {
    for (int c = 0; c < nc; c++) {
      const float* xc = X + c * xcs;
      for (int k = 0; k < CH; k += VW)
        for (int o = 0; o < ot; o++) { vf wv = ldf((const float*)(p[o] + c * cs[o]) + k); ROWS_FMA(wv, k); }
    }
  } else if (w->fmt == QS_BF16) {
    for (int c = 0; c < nc; c++) {
      const float* xc = X + c * xcs;
      for (int k = 0; k < CH; k += VW)
        for (int o = 0; o < ot; o++) { vf wv = w_bf16((const uint16_t*)(p[o] + c * cs[o]) + k); ROWS_FMA(wv, k); }
    }
  } else if (w->fmt == QS_I8) {
    for (int c = 0; c < nc; c++) {
      const float* xc = X + c * xcs;
      for (int k = 0; k < CH; k += VW)
        for (int o = 0; o < ot; o++) { vf wv = w_i8((const int8_t*)(p[o] + c * cs[o]) + k); ROWS_FMA(wv, k); }
    }
  } else { /* QS_Q4: w = d * q + m */
    for (int c = 0; c < nc; c++) {
      const float* xc = X + c * xcs;
      vf dv[OB], mv[OB];
      for (int o = 0; o < ot; o++) {
        const uint8_t* b = p[o] + c * cs[o];
        dv[o] = (vf){0} + h2f_at(b);
        mv[o] = (vf){0} + h2f_at(b + 2);
      }
      for (int k = 0; k < CH; k += VW)
        for (int o = 0; o < ot; o++) {
          const uint8_t* q = p[o] + c * cs[o] + 4;
          vf wv = fmadd(dv[o], k < 16 ? w_lo(q + k) : w_hi(q + k - 16), mv[o]);
          ROWS_FMA(wv, k);
        }
    }
  }
#undef ROWS_FMA
  for (int o = 0; o < ot; o++) {
    float s = w->fmt == QS_I8 ? w->scale[o0 + o] : 1.f, b = w->bias ? w->bias[o0 + o] : 0.f;
    for (int r = 0; r < rt; r++) {
      float y = hsum(acc[o][r]);
      res[r][o] = (w->fmt == QS_I8 ? y * s : y) + b;
    }
  }
}

/* Rows r0.. (rt <= RB of them) of X (R, K) into xp chunk-interleaved: [chunk c][row r][CH]. */
static void pack_rows(const float* X, size_t ldx, int rt, int K, float* xp) {
  for (int c = 0; c < K / CH; c++)
    for (int r = 0; r < rt; r++) memcpy(xp + ((size_t)c * rt + r) * CH, X + r * ldx + (size_t)c * CH, CH * sizeof(float));
}

/* Outputs o0..o0+no-1 (no <= OB) for rt <= RB rows (X row-major, xp the same rows packed when rt
   > 2), with at least four independent accumulators where the rows allow: one or two rows as 4
   outputs x rows (while the weights stream from memory), three or four rows as 2 outputs x rows,
   more one output at a time over all of them (each weight converted once per tile of rows). */
static void block(const qs_weight* w, int o0, int no, const float* X, size_t ldx, const float* xp, int rt,
                  float res[RB][OB]) {
  if (rt <= 2) {
    if (no == OB && rt == 1) { tile(w, o0, OB, X, ldx, CH, 1, res); return; }
    if (no == OB) { tile(w, o0, OB, X, ldx, CH, 2, res); return; }
    for (int o = 0; o < no; o++) {
      float part[RB][OB];
      if (rt == 1) tile(w, o0 + o, 1, X, ldx, CH, 1, part);
      else tile(w, o0 + o, 1, X, ldx, CH, 2, part);
      for (int r = 0; r < rt; r++) res[r][o] = part[r][0];
    }
    return;
  }
  float part[RB][OB];
  for (int o = 0; o < no;) {
    int two = no - o >= 2 && rt <= 4;
    switch (two ? 10 + rt : rt) {
      case 13: tile(w, o0 + o, 2, xp, CH, 3 * CH, 3, part); break;
      case 14: tile(w, o0 + o, 2, xp, CH, 4 * CH, 4, part); break;
      case 3: tile(w, o0 + o, 1, xp, CH, 3 * CH, 3, part); break;
      case 4: tile(w, o0 + o, 1, xp, CH, 4 * CH, 4, part); break;
      case 5: tile(w, o0 + o, 1, xp, CH, 5 * CH, 5, part); break;
      case 6: tile(w, o0 + o, 1, xp, CH, 6 * CH, 6, part); break;
      case 7: tile(w, o0 + o, 1, xp, CH, 7 * CH, 7, part); break;
      default: tile(w, o0 + o, 1, xp, CH, 8 * CH, 8, part); break;
    }
    for (int j = 0; j < 1 + two; j++, o++)
      for (int r = 0; r < rt; r++) res[r][o] = part[r][j];
  }
}

/* ---- bfloat16 dot products (AVX-512 BF16): the matmuls of a step with bfloat16 activations ----
   With bfloat16 activations and a CPU that has vdpbf16ps, a matmul's input rows are rounded to
   bfloat16 once (as the model's own bfloat16 linears see them) and each weight chunk of 32 meets
   them in one vdpbf16ps per row: 32 products, exact in float32, summed into 16 float32 lanes.
   Weights: bfloat16 as they are; int8 codes converted to bfloat16 (exact: |q| <= 128), the scale
   applied at the end; 4-bit codes q (exact in bfloat16) as d * (x . q) + m * (x . 1) per chunk.
   The sums stay float32 in a fixed order, so a row's result still does not depend on the others. */
#if VW == 16 && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define QS_DP 1
static inline __m512bh dp_i8(const int8_t* p) {
  __m256i b = _mm256_loadu_si256((const __m256i*)p);
  __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
  __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
  return _mm512_cvtne2ps_pbh(f1, f0);
}
static inline __m512bh dp_q4(const uint8_t* q, __m512i lut) { /* 16 bytes of codes: weights 0..15 low nibbles, 16..31 high */
  __m128i b = _mm_loadu_si128((const __m128i*)q), m = _mm_set1_epi8(15);
  __m256i n = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
  return (__m512bh)_mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(n), lut);
}
/* rows 0..rt-1 of X (bfloat16, row stride ldx) against outputs o0..o0+ot-1 -> res[r][o] */
static inline __attribute__((always_inline)) void tile_dp(const qs_weight* w, int o0, const int ot, const uint16_t* X,
                                                          size_t ldx, const int rt, float res[RB][OB]) {
  const int nc = w->in / CH;
  const uint8_t* p[OB];
  size_t cs[OB];
  __m512 acc[OB][RB];
  for (int o = 0; o < ot; o++) {
    p[o] = row_at(w, o0 + o, &cs[o]);
    for (int r = 0; r < rt; r++) acc[o][r] = _mm512_setzero_ps();
  }
#define XV(r) ((__m512bh)_mm512_loadu_si512(X + (r) * ldx + (size_t)c * CH))
  if (w->fmt == QS_BF16) {
    /* each output's row read whole at every row count (one sequential stream a thread): chunk by chunk
       across 4 rows measured 19.5 against 10.9 ms at 3 rows, 19.5 against 14.5 at 4, 25.3 against 22.1
       at 8 (the whole step's bf16 matmuls, SmolLM2-135M, 2 threads); same sums, same order */
    for (int o = 0; o < ot; o++)
      for (int c = 0; c < nc; c++) {
        __m512bh wv = (__m512bh)_mm512_loadu_si512(p[o] + c * cs[o]);
        for (int r = 0; r < rt; r++) acc[o][r] = _mm512_dpbf16_ps(acc[o][r], XV(r), wv);
      }
  } else if (w->fmt == QS_I8) {
    for (int c = 0; c < nc; c++)
      for (int o = 0; o < ot; o++) {
        __m512bh wv = dp_i8((const int8_t*)(p[o] + c * cs[o]));
        for (int r = 0; r < rt; r++) acc[o][r] = _mm512_dpbf16_ps(acc[o][r], XV(r), wv);
      }
  } else { /* QS_Q4 */
    static const uint16_t lut16[32] = {0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
                                       0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
    const __m512i lut = _mm512_loadu_si512(lut16);
    const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80);
    for (int c = 0; c < nc; c++) {
      __m512 sx[RB];
      for (int r = 0; r < rt; r++) sx[r] = _mm512_dpbf16_ps(_mm512_setzero_ps(), XV(r), ones);
      for (int o = 0; o < ot; o++) {
        const uint8_t* b = p[o] + c * cs[o];
        __m512 dv = _mm512_set1_ps(h2f_at(b)), mv = _mm512_set1_ps(h2f_at(b + 2));
        __m512bh wv = dp_q4(b + 4, lut);
        for (int r = 0; r < rt; r++)
          acc[o][r] = _mm512_fmadd_ps(dv, _mm512_dpbf16_ps(_mm512_setzero_ps(), XV(r), wv), _mm512_fmadd_ps(mv, sx[r], acc[o][r]));
      }
    }
  }
#undef XV
  for (int o = 0; o < ot; o++) {
    float s = w->fmt == QS_I8 ? w->scale[o0 + o] : 1.f, b = w->bias ? w->bias[o0 + o] : 0.f;
    for (int r = 0; r < rt; r++) {
      float y = hsum((vf)acc[o][r]);
      res[r][o] = (w->fmt == QS_I8 ? y * s : y) + b;
    }
  }
}
/* block() for bfloat16 rows: 4 outputs x up to 4 rows a tile (16 accumulators; 2 or 1 outputs for the
   last of a weight's outputs), more rows in passes of 4, the block's weights read from cache after the
   first. At 8 rows, 4 x 4 twice took 19.4 ms against 22.9 for 2 outputs x 8 rows once (the whole step's
   int8 matmuls, SmolLM2-135M, 2 threads, AVX-512 BF16); 2 x 2 and 3 x 3 were slower. */
static void block_dp(const qs_weight* w, int o0, int no, const uint16_t* X, size_t ldx, int rt, float res[RB][OB]) {
  if (rt > 4) {
    float rest[RB][OB];
    block_dp(w, o0, no, X, ldx, 4, res);
    block_dp(w, o0, no, X + 4 * ldx, ldx, rt - 4, rest);
    for (int r = 4; r < rt; r++)
      for (int o = 0; o < no; o++) res[r][o] = rest[r - 4][o];
    return;
  }
  float part[RB][OB];
  for (int o = 0; o < no;) {
    int take = no - o == OB ? OB : no - o >= 2 ? 2 : 1;
    switch (take * 16 + rt) {
      case 4 * 16 + 1: tile_dp(w, o0 + o, 4, X, ldx, 1, part); break;
      case 4 * 16 + 2: tile_dp(w, o0 + o, 4, X, ldx, 2, part); break;
      case 4 * 16 + 3: tile_dp(w, o0 + o, 4, X, ldx, 3, part); break;
      case 4 * 16 + 4: tile_dp(w, o0 + o, 4, X, ldx, 4, part); break;
      case 2 * 16 + 1: tile_dp(w, o0 + o, 2, X, ldx, 1, part); break;
      case 2 * 16 + 2: tile_dp(w, o0 + o, 2, X, ldx, 2, part); break;
      case 2 * 16 + 3: tile_dp(w, o0 + o, 2, X, ldx, 3, part); break;
      case 2 * 16 + 4: tile_dp(w, o0 + o, 2, X, ldx, 4, part); break;
      case 1 * 16 + 1: tile_dp(w, o0 + o, 1, X, ldx, 1, part); break;
      case 1 * 16 + 2: tile_dp(w, o0 + o, 1, X, ldx, 2, part); break;
      case 1 * 16 + 3: tile_dp(w, o0 + o, 1, X, ldx, 3, part); break;
      default: tile_dp(w, o0 + o, 1, X, ldx, 4, part); break;
    }
    for (int j = 0; j < take; j++, o++)
      for (int r = 0; r < rt; r++) res[r][o] = part[r][j];
  }
}
/* X (R, K) float32 -> xb (R, K) bfloat16, rounded to nearest even (K % 32 == 0) */
static void to_bf16_rows(const float* X, size_t ldx, int R, int K, uint16_t* xb) {
  for (int r = 0; r < R; r++)
    for (int k = 0; k < K; k += 32) {
      const float* x = X + (size_t)r * ldx + k;
      _mm512_storeu_si512(xb + (size_t)r * K + k, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 16), _mm512_loadu_ps(x)));
    }
}
#else
#define QS_DP 0
#endif

/* Every row tile of X (R, K) packed into xp (this thread's R * K floats) when it has over 2 rows. */
static void pack_all(const float* X, size_t ldx, int R, int K, float* xp) {
  for (int r0 = 0; r0 < R && R > 2; r0 += RB) pack_rows(X + (size_t)r0 * ldx, ldx, R - r0 < RB ? R - r0 : RB, K, xp + (size_t)r0 * K);
}

/* Y[r][o] (=, or += with add) over every output channel; called inside a parallel region, xp:
   this thread's scratch of R * in floats. */
/* This thread's copy of the rows X (R, K) for w's tiles, in xp: rounded to bfloat16 when dp asks for
   bfloat16 dot products and w is not float32 (returns 1), else packed as pack_all does (returns 0). */
static int prep_rows(const qs_weight* w, const float* X, size_t ldx, int R, float* xp, int dp) {
#if QS_DP
  if (dp && w->fmt != QS_F32) { to_bf16_rows(X, ldx, R, w->in, (uint16_t*)xp); return 1; }
#else
  (void)dp;
#endif
  pack_all(X, ldx, R, w->in, xp);
  return 0;
}

/* block() of rows r0..r0+rt-1, from the rows prep_rows made (bf: it rounded them to bfloat16). */
static inline void rows_block(const qs_weight* w, int o0, int no, const float* X, size_t ldx, const float* xp, int r0,
                              int rt, int bf, float res[RB][OB]) {
#if QS_DP
  if (bf) { block_dp(w, o0, no, (const uint16_t*)xp + (size_t)r0 * w->in, w->in, rt, res); return; }
#else
  (void)bf;
#endif
  block(w, o0, no, X + (size_t)r0 * ldx, ldx, xp + (size_t)r0 * w->in, rt, res);
}

/* Blocks of OB outputs a thread takes at a time, of nb: long contiguous runs, since the weights stream
   from memory (8 blocks at a time measured 1.4x slower than 64 for int8 weights at one row, 2 threads),
   yet at least two runs per thread where there are enough blocks; between 8 and GB. */
static inline int grab(int nb) {
#ifdef _OPENMP
  const int nt = omp_get_num_threads();
#else
  const int nt = 1;
#endif
  const int g = nb / (2 * nt);
  return g < 8 ? 8 : g > GB ? GB : g;
}

static void matmul(const qs_weight* w, const float* X, size_t ldx, int R, float* Y, size_t ldy, int add, float* xp, int dp) {
  const int bf = prep_rows(w, X, ldx, R, xp, dp), nb = (w->out + OB - 1) / OB, per = grab(nb);
#pragma omp for schedule(dynamic, per)
  for (int b = 0; b < nb; b++) {
    int o0 = b * OB, no = w->out - o0 < OB ? w->out - o0 : OB;
    for (int r0 = 0; r0 < R; r0 += RB) {
      int rt = R - r0 < RB ? R - r0 : RB;
      float res[RB][OB];
      rows_block(w, o0, no, X, ldx, xp, r0, rt, bf, res);
      for (int r = 0; r < rt; r++)
        for (int o = 0; o < no; o++) {
          float* y = Y + (size_t)(r0 + r) * ldy + o0 + o;
          *y = add ? *y + res[r][o] : res[r][o];
        }
    }
  }
}
