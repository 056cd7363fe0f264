// CPU kernels for decoding, where PyTorch's stock kernels fall short (bench/decode.py):
//   mm_int8: x @ W with W int8 per output column and x quantized to int16 per block of 32 on the
//            fly; AVX-512 VNNI dot products (a portable loop elsewhere).
//   mm_f32:  x @ W in fp32 for up to a few hundred rows (decode steps, drafts, prompts), straight
//            from W's (in, out) layout, so no packed copy of the weights is needed.
//   attend:  attention of decode steps (and drafts) over the KV cache.
//   decode_layers: tokens of any cache rows (a decode step, drafts, short prompts, or all of
//            these at once) through every block in one call from Python (per-op dispatch from
//            Python cost ~2 ms a token): the matmuls above, with GELU and the residual adds done
//            on each output tile while it is in cache, LayerNorm by hand, and no allocation per
//            layer.
//   decode_step: a decode step from token ids to logits (embeddings, decode_layers, ln_f, head).
//   argmax_rows, sample: the next token from the logits (greedy, or drawn).
// Built by cpu_kernels.py with -march=native on the machine that runs it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define FAST_PATH 1
#else
#define FAST_PATH 0
#endif

constexpr int TILE = 64;   // output columns per tile (4 x 16 lanes)
constexpr int BLOCK = 32;  // activations share one scale per 32 inputs

bool fast_path() { return FAST_PATH; }

// Rows of activations quantized to int16 per block: q = round(x / s), s = max|x| / 32767, zero-padded
// to Kp. int16 keeps them as good as fp32 here (bench/quality.py: int8 activations, as in
// llama.cpp's q8_0, cost trained models a quarter of their greedy agreement); 32 products of an
// int16 and an int8 cannot overflow the int32 sums.
struct QRows {
  std::vector<int16_t> q;
  std::vector<float> s;
};

static void quantize_rows(const float* x, int64_t M, int64_t K, int64_t Kp, QRows& r) {
  const int64_t nb = Kp / BLOCK;
  r.q.assign(M * Kp, 0);
  r.s.assign(M * nb, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * BLOCK, k1 = std::min(K, k0 + BLOCK);
      float amax = 0.f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(x[m * K + k]));
      const float inv = amax > 0.f ? 32767.f / amax : 0.f;
      for (int64_t k = k0; k < k1; ++k) r.q[m * Kp + k] = (int16_t)std::nearbyint(x[m * K + k] * inv);
      r.s[m * nb + b] = amax / 32767.f;
    }
}

#if FAST_PATH
// exp(x) for x <= 0 (softmax after subtracting the maximum, sigmoid): 2^n * e^r with
// |r| <= ln2 / 2 and a degree-6 polynomial for e^r (relative error ~2e-7); below -87 it is ~0.
static inline __m512 exp_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147181f), x);
  __m512 e = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(e, n);
}
#endif

// GELU, tanh form as GPT-2's: 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), computed
// as x * sigmoid(2u) (the same function; no 1 - e cancellation), in place.
static void gelu_inplace(float* y, int64_t n) {
  int64_t i = 0;
#if FAST_PATH
  const __m512 c1 = _mm512_set1_ps(2 * 0.7978845608f), c3 = _mm512_set1_ps(2 * 0.7978845608f * 0.044715f);
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(y + i);
    const __m512 u2 = _mm512_mul_ps(x, _mm512_fmadd_ps(_mm512_mul_ps(x, x), c3, c1));  // 2u
    const __m512 e = exp_neg(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(u2)));  // exp(-|2u|)
    const __m512 inv = _mm512_div_ps(one, _mm512_add_ps(one, e));
    const __mmask16 neg = _mm512_cmp_ps_mask(u2, _mm512_setzero_ps(), _CMP_LT_OQ);
    _mm512_storeu_ps(y + i, _mm512_mul_ps(x, _mm512_mask_mul_ps(inv, neg, inv, e)));  // sigmoid(2u)
  }
#endif
  for (; i < n; ++i) y[i] = 0.5f * y[i] * (1.f + std::tanh(0.7978845608f * (y[i] + 0.044715f * y[i] * y[i] * y[i])));
}

// What a matmul does to each output tile right after computing it, while the tile is in cache and
// on the thread that wrote it: nothing, GELU in place, or add it to a residual stream
// (res[m, n] += y[m, n]: the bits of x + y).
struct Epilogue {
  enum Kind { NONE, GELU, ADD } kind = NONE;
  float* res = nullptr;  // ADD: (M, N) like y
  void operator()(float* y, int64_t N, int64_t m0, int64_t m1, int64_t n0, int64_t n1) const {
    for (int64_t m = m0; m < m1 && kind != NONE; ++m) {
      float* ym = y + m * N;
      if (kind == GELU) {
        gelu_inplace(ym + n0, n1 - n0);
      } else {
        float* rm = res + m * N;
#pragma omp simd
        for (int64_t n = n0; n < n1; ++n) rm[n] += ym[n];
      }
    }
  }
};

// acc[i][0:TILE] = x[m0 + i] @ W[:, tile] for MB rows. w: this tile's (Kp/2, TILE, 2) int8, two
// consecutive inputs of one column side by side, as the VNNI int16 dot product (vpdpwssd) reads them.
template <int MB>
static void int8_tile(const QRows& r, int64_t m0, int64_t Kp, const int8_t* w, float* acc) {
  const int64_t nb = Kp / BLOCK;
  std::fill(acc, acc + MB * TILE, 0.f);
#if FAST_PATH
  constexpr int U = MB == 1 ? 2 : 1;  // one row: two accumulator sets keep more dot products in flight
  for (int64_t b = 0; b < nb; ++b) {
    __m512i iacc[U][MB][4];
    for (int u = 0; u < U; ++u)
      for (int i = 0; i < MB; ++i)
        for (int v = 0; v < 4; ++v) iacc[u][i][v] = _mm512_setzero_si512();
    for (int g = 0; g < BLOCK / 2; ++g) {
      const int64_t kp = b * (BLOCK / 2) + g;
      __m512i wv[4];
      for (int v = 0; v < 4; ++v)
        wv[v] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + kp * TILE * 2 + 32 * v)));
      for (int i = 0; i < MB; ++i) {
        int32_t x2;
        std::memcpy(&x2, r.q.data() + (m0 + i) * Kp + kp * 2, 4);
        const __m512i xv = _mm512_set1_epi32(x2);
        for (int v = 0; v < 4; ++v) iacc[g % U][i][v] = _mm512_dpwssd_epi32(iacc[g % U][i][v], wv[v], xv);
      }
    }
    for (int i = 0; i < MB; ++i) {
      const __m512 s = _mm512_set1_ps(r.s[(m0 + i) * nb + b]);
      for (int v = 0; v < 4; ++v) {
        __m512i sum = iacc[0][i][v];
        if (U == 2) sum = _mm512_add_epi32(sum, iacc[U - 1][i][v]);
        float* a = acc + i * TILE + 16 * v;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), s, _mm512_loadu_ps(a)));
      }
    }
  }
#else
  for (int i = 0; i < MB; ++i)
    for (int64_t b = 0; b < nb; ++b) {
      int32_t iacc[TILE] = {};
      for (int64_t kp = b * (BLOCK / 2); kp < (b + 1) * (BLOCK / 2); ++kp)
        for (int n = 0; n < TILE; ++n)
          for (int t = 0; t < 2; ++t)
            iacc[n] += (int32_t)w[(kp * TILE + n) * 2 + t] * r.q[(m0 + i) * Kp + kp * 2 + t];
      for (int n = 0; n < TILE; ++n) acc[i * TILE + n] += (float)iacc[n] * r.s[(m0 + i) * nb + b];
    }
#endif
}

// y (M, N) = (x @ W) * scale + bias, then ep. wq: (N/TILE, Kp/2, TILE, 2) int8 round(W / scale).
static void int8_linear(const float* x, int64_t M, int64_t K, const int8_t* wq, int64_t tiles, int64_t Kp,
                        const float* scale, const float* bias, int64_t N, float* y, const Epilogue& ep) {
  QRows r;
  quantize_rows(x, M, K, Kp, r);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    float acc[4 * TILE];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * TILE, nn = std::min<int64_t>(TILE, N - n0);
      for (int64_t m = 0; m < M;) {
        const int mb = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
        if (mb == 4) int8_tile<4>(r, m, Kp, wq + t * Kp * TILE, acc);
        else if (mb == 2) int8_tile<2>(r, m, Kp, wq + t * Kp * TILE, acc);
        else int8_tile<1>(r, m, Kp, wq + t * Kp * TILE, acc);
        for (int i = 0; i < mb; ++i)
          for (int64_t n = 0; n < nn; ++n)
            y[(m + i) * N + n0 + n] = acc[i * TILE + n] * scale[n0 + n] + (bias ? bias[n0 + n] : 0.f);
        m += mb;
      }
      ep(y, N, 0, M, n0, n0 + nn);
    }
  });
}

torch::Tensor mm_int8(torch::Tensor x, torch::Tensor wq, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                      int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous fp32 (M, K)");
  const int64_t M = x.size(0), K = x.size(1), Kp = wq.size(1) * 2;
  TORCH_CHECK(K <= Kp && Kp % BLOCK == 0 && wq.size(0) * TILE >= N, "x and the packed weight disagree in shape");
  auto y = torch::empty({M, N}, x.options());
  int8_linear(x.data_ptr<float>(), M, K, wq.data_ptr<int8_t>(), wq.size(0), Kp, scale.data_ptr<float>(),
              bias ? bias->data_ptr<float>() : nullptr, N, y.data_ptr<float>(), Epilogue{});
  return y;
}

#if FAST_PATH
// Lane masks for a tile whose first `cols` columns exist: the last tile of an N that is no
// multiple of the tile width is read and written through them (a masked load never faults).
// Whole tiles load without masks (MASKED = false): masked loads in the inner loop cost ~5%.
template <int V>
static inline void tile_masks(int64_t cols, __mmask16* mk) {
  for (int v = 0; v < V; ++v) {
    const int64_t c = cols - 16 * v;
    mk[v] = c >= 16 ? (__mmask16)0xFFFF : c <= 0 ? (__mmask16)0 : (__mmask16)((1u << c) - 1);
  }
}

template <bool MASKED>
static inline __m512 load_lanes(__mmask16 mk, const float* p) {
  return MASKED ? _mm512_maskz_loadu_ps(mk, p) : _mm512_loadu_ps(p);
}

// y[i, 0:cols] = x[i] @ w[:, 0:cols] + b for MB rows over V vectors of 16 columns, cols <= 16 V;
// w row-major (K, N). Eight rows (of a batch's decode step) use 48 columns (24 accumulators), so
// w is read from memory once for all eight. Each row of w is a new page to the hardware
// prefetcher, so rows are prefetched 16 ahead (Xeon: 1.7x faster).
constexpr int TILE8 = 48;
template <int MB, int V, bool MASKED>
static void f32_tile(const float* x, int64_t K, const float* w, int64_t N, const float* b, float* y, int64_t cols) {
  __mmask16 mk[V];
  tile_masks<V>(cols, mk);
  __m512 acc[MB][V];
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (MB == 8) {
      const char* ahead = (const char*)(w + (k + 16) * N);  // past the end near K: prefetch never faults
      for (int line = 0; line < 4; ++line) _mm_prefetch(ahead + std::min(64 * line, 64 * V - 1), _MM_HINT_T0);
    }
    __m512 wv[V];
    for (int v = 0; v < V; ++v) wv[v] = load_lanes<MASKED>(mk[v], w + k * N + 16 * v);
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * K + k]);
      for (int v = 0; v < V; ++v) acc[i][v] = _mm512_fmadd_ps(xv, wv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < V; ++v)
      _mm512_mask_storeu_ps(y + i * N + 16 * v, mk[v],
                            b ? _mm512_add_ps(acc[i][v], _mm512_maskz_loadu_ps(mk[v], b + 16 * v)) : acc[i][v]);
}

// y[m, 0:cols] = x[m, 0:K] @ w[0:K, 0:cols] for the M rows of x (xs apart) and of y (ys apart), w's
// rows N apart, overwriting y: eight rows of w at a time (eight sequential streams, each the panel's
// width) go into registers once and into the sums of every row of x, kept in y (in L1 or L2).
template <bool FULL>
static inline void panel_rows(const float* x, int64_t xs, int64_t M, int64_t k, int U, const float* wk, int64_t N,
                              float* y, int64_t ys, int64_t c, __mmask16 mk) {
  __m512 wv[8];
  for (int u = 0; u < (FULL ? 8 : U); ++u)
    wv[u] = FULL ? _mm512_loadu_ps(wk + u * N + c) : _mm512_maskz_loadu_ps(mk, wk + u * N + c);
  for (int64_t m = 0; m < M; ++m) {
    float* ym = y + m * ys + c;
    const float* xm = x + m * xs + k;
    __m512 acc = FULL ? _mm512_loadu_ps(ym) : _mm512_maskz_loadu_ps(mk, ym);
    for (int u = 0; u < (FULL ? 8 : U); ++u) acc = _mm512_fmadd_ps(_mm512_set1_ps(xm[u]), wv[u], acc);
    if (FULL) _mm512_storeu_ps(ym, acc);
    else _mm512_mask_storeu_ps(ym, mk, acc);
  }
}

static void row_panel(const float* x, int64_t xs, int64_t M, int64_t K, const float* w, int64_t N, float* y, int64_t ys,
                      int64_t cols) {
  const int64_t whole = cols / 16 * 16;
  const __mmask16 tail = (__mmask16)((1u << (cols - whole)) - 1);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < cols; c += 16)
      _mm512_mask_storeu_ps(y + m * ys + c, c < whole ? 0xFFFF : tail, _mm512_setzero_ps());
  for (int64_t k = 0; k < K; k += 8) {
    const int U = (int)std::min<int64_t>(8, K - k);
    const float* wk = w + k * N;
    int64_t c = 0;
    if (U == 8)
      for (; c < whole; c += 16) panel_rows<true>(x, xs, M, k, 8, wk, N, y, ys, c, 0xFFFF);
    for (; c < cols; c += 16) panel_rows<false>(x, xs, M, k, U, wk, N, y, ys, c, c < whole ? 0xFFFF : tail);
  }
}

// Up to K_SPLIT_ROWS rows (a single stream's decode step, a short prompt, drafts, a small batch):
// the threads split K, not the columns, so each reads one contiguous block of w's rows, in panels of
// up to PANEL_FLOATS / M columns (the rows' sums stay in L1 or L2), and the hardware prefetchers
// see long sequential runs. Column tiles instead jump N floats (a new 4 KB page) every few hundred
// bytes read: on a 2-core AMD EPYC (Zen 4) those read w at 15-19 GB/s, this at 30-45, and 9 rows
// of a 768 x 3072 weight take 0.4 ms instead of 0.6 (docs/performance.md). The partial sums (M
// rows per chunk of K) meet in a second pass that adds the bias and applies ep.
constexpr int64_t PANEL_FLOATS = 1 << 14;  // 64 KB of sums
static void f32_rows(const float* x, int64_t M, int64_t K, const float* w, int64_t N, const float* b, float* y,
                     const Epilogue& ep) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), K / 64));
  const int64_t panel = std::max<int64_t>(16, std::min<int64_t>(4096, PANEL_FLOATS / M / 16 * 16));
  // each chunk's sums, rows ys apart: N + 16 keeps rows whose stride is a multiple of 4 KB (N = 3072)
  // from falling into the same L1 sets
  const int64_t ys = N + 16;
  static thread_local std::vector<float> partials;
  partials.resize(chunks * M * ys);
  float* part = partials.data();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k0 = K * c / chunks / 8 * 8, k1 = c == chunks - 1 ? K : K * (c + 1) / chunks / 8 * 8;
      for (int64_t n = 0; n < N; n += panel)
        row_panel(x + k0, K, M, k1 - k0, w + k0 * N + n, N, part + c * M * ys + n, ys, std::min(panel, N - n));
    }
  });
  at::parallel_for(0, N, 2048 / M + 1, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      float* ym = y + m * N;
      const float* p0 = part + m * ys;
#pragma omp simd
      for (int64_t n = n0; n < n1; ++n) ym[n] = p0[n] + (b ? b[n] : 0.f);
      for (int64_t c = 1; c < chunks; ++c) {
        const float* pc = part + (c * M + m) * ys;
#pragma omp simd
        for (int64_t n = n0; n < n1; ++n) ym[n] += pc[n];
      }
    }
    ep(y, N, 0, M, n0, n1);
  });
}

// Rows m..M-1 (fewer than 8) of one column tile of V vectors: 4, 2 and 1 rows at a time.
template <int V, bool MASKED>
static void f32_rest(const float* x, int64_t m, int64_t M, int64_t K, const float* w, int64_t N, const float* b,
                     float* y, int64_t cols) {
  for (; m + 4 <= M; m += 4) f32_tile<4, V, MASKED>(x + m * K, K, w, N, b, y + m * N, cols);
  for (; m + 2 <= M; m += 2) f32_tile<2, V, MASKED>(x + m * K, K, w, N, b, y + m * N, cols);
  for (; m < M; ++m) f32_tile<1, V, MASKED>(x + m * K, K, w, N, b, y + m * N, cols);
}

// y (M, N) = x @ w + b, then ep; w (K, N) fp32 as stored. Up to K_SPLIT_ROWS rows: f32_rows. More:
// rows 8 at a time over 48-column tiles, the last few on each tile while it is in L2, so w is read
// from memory once; the threads split the tiles, so each weight is read by one thread, once.
constexpr int64_t K_SPLIT_ROWS = 16;
static void f32_linear(const float* x, int64_t M, int64_t K, const float* w, int64_t N, const float* b, float* y,
                       const Epilogue& ep) {
  if (M <= K_SPLIT_ROWS) {
    f32_rows(x, M, K, w, N, b, y, ep);
    return;
  }
  const int64_t M8 = M / 8 * 8;
  at::parallel_for(0, (N + TILE8 - 1) / TILE8, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t n = t0 * TILE8; n < std::min(N, t1 * TILE8); n += TILE8) {
      const int64_t cols = std::min<int64_t>(TILE8, N - n);
      const bool whole = cols == TILE8;
      const float* bn = b ? b + n : nullptr;
      const auto tile = whole ? f32_tile<8, TILE8 / 16, false> : f32_tile<8, TILE8 / 16, true>;
      for (int64_t m = 0; m < M8; m += 8) tile(x + m * K, K, w + n, N, bn, y + m * N + n, cols);
      (whole ? f32_rest<TILE8 / 16, false> : f32_rest<TILE8 / 16, true>)(x, M8, M, K, w + n, N, bn, y + n, cols);
      ep(y, N, 0, M, n, n + cols);
    }
  });
}
#endif

// y (M, N) = x @ w + bias, w (K, N) fp32 as stored: for a few rows (batched decode).
torch::Tensor mm_f32(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(FAST_PATH, "mm_f32 needs AVX-512; use addmm");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous() && x.size(1) == w.size(0), "shapes");
  auto y = torch::empty({x.size(0), w.size(1)}, x.options());
#if FAST_PATH
  f32_linear(x.data_ptr<float>(), x.size(0), x.size(1), w.data_ptr<float>(), w.size(1),
             bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), Epilogue{});
#endif
  return y;
}

#if FAST_PATH
// One query of head size 64 over L cached positions (rows st floats apart); p: L + 16 floats of room.
static void attend_row64(const float* q, const float* k, const float* v, int64_t st, int64_t L, float scale,
                         float* p, float* y) {
  __m512 qv[4];
  for (int u = 0; u < 4; ++u) qv[u] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * u), _mm512_set1_ps(scale));
  float mx = -INFINITY;
  for (int64_t t = 0; t < L; ++t) {
    const float* kt = k + t * st;
    __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kt));
    for (int u = 1; u < 4; ++u) a = _mm512_fmadd_ps(qv[u], _mm512_loadu_ps(kt + 16 * u), a);
    p[t] = _mm512_reduce_add_ps(a);
    mx = std::max(mx, p[t]);
  }
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; t += 16) {
    const __mmask16 m = L - t >= 16 ? 0xFFFF : (__mmask16)((1u << (L - t)) - 1);
    const __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + t), _mm512_set1_ps(mx)));
    _mm512_mask_storeu_ps(p + t, m, e);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  __m512 acc[4];
  for (int u = 0; u < 4; ++u) acc[u] = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    const __m512 w = _mm512_set1_ps(p[t]);
    for (int u = 0; u < 4; ++u) acc[u] = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + t * st + 16 * u), acc[u]);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  for (int u = 0; u < 4; ++u) _mm512_storeu_ps(y + 16 * u, _mm512_mul_ps(acc[u], inv));
}
#endif

// Decoding attention: query j of row b sees that row's first lengths[b] + j cached positions:
// y[b, h, j] = softmax(q[b, h, j] . K[0:L] / sqrt(hs)) @ V[0:L]. One query per row in a decode
// step; a few when drafts are verified, each computed exactly as its own decode step would be.
// q: row b's (H, T, D) queries at q + b * q_row; y: (B, H, T, D) contiguous. k, v: the KV cache
// (B_cache, nh, T_cap, hs), row b's at cache row rows[b] (b where rows is null); slots past a
// row's length are never read (they may hold anything).
// torch's fused CPU attention takes ~2 ms a call for one query, its bmm path ~70 us.
static void attend_rows(const float* q, int64_t q_row, const torch::Tensor& k, const torch::Tensor& v,
                        const int64_t* rows, const int64_t* lengths, int64_t B, int64_t H, int64_t T, int64_t D,
                        float* y) {
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t sb = k.stride(0), sh = k.stride(1), st = k.stride(2);
  const float scale = 1.f / std::sqrt((float)D);
  at::parallel_for(0, B * H * T, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * T), h = (i / T) % H, L = lengths[b] + i % T;
      const float* qi = q + b * q_row + (i % (H * T)) * D;
      const int64_t r = rows ? rows[b] : b;
      const float* ki = kp + r * sb + h * sh;
      const float* vi = vp + r * sb + h * sh;
      p.resize(L + 16);
      float* yi = y + i * D;
#if FAST_PATH
      if (D == 64) {
        attend_row64(qi, ki, vi, st, L, scale, p.data(), yi);
        continue;
      }
#endif
      float mx = -INFINITY;
      for (int64_t t = 0; t < L; ++t) {
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += qi[d] * ki[t * st + d];
        p[t] = s * scale;
        mx = std::max(mx, p[t]);
      }
      float sum = 0.f;
      for (int64_t t = 0; t < L; ++t) sum += (p[t] = std::exp(p[t] - mx));
      std::fill(yi, yi + D, 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const float w = p[t] / sum;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) yi[d] += w * vi[t * st + d];
      }
    }
  });
}

// q (B, nh, T, hs); k, v the cache (B, nh, T_cap, hs) -> (B, nh, T, hs).
torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lengths) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.stride(3) == 1 && v.stride(3) == 1 &&
              k.strides() == v.strides() && lengths.scalar_type() == torch::kLong, "attend: bad arguments");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  auto qc = q.contiguous();
  auto y = torch::empty_like(qc);
  attend_rows(qc.data_ptr<float>(), H * T * D, k, v, nullptr, lengths.data_ptr<int64_t>(), B, H, T, D,
              y.data_ptr<float>());
  return y;
}

// LayerNorm of each row as torch's (biased variance): y = (x - mean) / sqrt(var + eps) * w + b.
static void layer_norm_rows(const float* x, int64_t M, int64_t C, const float* w, const float* b, float eps,
                            float* y) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * C;
    float* ym = y + m * C;
    float sum = 0.f, sq = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < C; ++c) sum += xm[c];
    const float mean = sum / C;
#pragma omp simd reduction(+ : sq)
    for (int64_t c = 0; c < C; ++c) sq += (xm[c] - mean) * (xm[c] - mean);
    const float rstd = 1.f / std::sqrt(sq / C + eps);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) ym[c] = (xm[c] - mean) * rstd * (w ? w[c] : 1.f) + (b ? b[c] : 0.f);
  }
}

static const float* data_or_null(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

// y (M, N) = x (M, K) @ W + b, then ep, for one of the blocks' linears: fp32 (K, N) weights, or
// int8 packed with a scale per column. An empty bias tensor means none.
static void block_linear(const float* x, int64_t M, int64_t K, const torch::Tensor& w, const torch::Tensor& scale,
                         const torch::Tensor& b, float* y, const Epilogue& ep = Epilogue{}) {
  if (w.scalar_type() == torch::kChar) {
    int8_linear(x, M, K, w.data_ptr<int8_t>(), w.size(0), w.size(1) * 2, scale.data_ptr<float>(), data_or_null(b),
                scale.size(0), y, ep);
    return;
  }
  TORCH_CHECK(FAST_PATH && w.size(0) == K && w.is_contiguous(), "decode_layers: fp32 needs AVX-512 and (K, N) weights");
#if FAST_PATH
  f32_linear(x, M, K, w.data_ptr<float>(), w.size(1), data_or_null(b), y, ep);
#endif
}

// The residual stream xs (B, C) of B tokens (one a row) through every block, in place. params: 16
// tensors per layer: ln_1 weight, bias; c_attn; attn.c_proj; ln_2 weight, bias; c_fc; mlp.c_proj,
// each linear as weight (fp32 (in, out), or int8 packed), scale (int8 only, else empty), bias
// (empty when none); an empty LayerNorm weight or bias means none. k[l], v[l]: the layer's cache
// (B_cache, nh, T_cap, hs); token b's key and value go to position pos[b] of cache row rows[b]
// (row b where rows is empty), and its query sees that row's positions 0..pos[b]: a decode step
// is a token per cache row; one sequence's drafts, or a batch of prompts, are several tokens of a
// row at consecutive positions, each seeing the ones before it as its own decode step would
// (every token's key and value are written before any attends). The ops of Block.forward, with
// the same matmul kernels; LayerNorm and GELU are written here, so results agree with it to float
// rounding, not bit for bit.
static void run_layers(float* xs, int64_t B, int64_t C, const std::vector<torch::Tensor>& params,
                       const std::vector<torch::Tensor>& k, const std::vector<torch::Tensor>& v, const torch::Tensor& pos,
                       const torch::Tensor& rows, int64_t n_head, double eps) {
  const int64_t hs = C / n_head, L = k.size();
  TORCH_CHECK(params.size() == 16 * (size_t)L && v.size() == (size_t)L && pos.numel() == B &&
              pos.scalar_type() == torch::kLong && pos.is_contiguous() &&
              (rows.numel() == 0 || (rows.numel() == B && rows.scalar_type() == torch::kLong && rows.is_contiguous())),
              "decode_layers: bad arguments");
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* rp = rows.numel() ? rows.data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {  // every layer's cache has the same shape
    const int64_t r = rp ? rp[b] : b;
    TORCH_CHECK(L == 0 || (0 <= pp[b] && pp[b] < k[0].size(2) && 0 <= r && r < k[0].size(0)),
                "decode_layers: a token's cache row or position is out of range");
  }
  std::vector<int64_t> lengths(pp, pp + B);
  for (auto& n : lengths) ++n;
  auto scratch = torch::empty({B, 10 * C}, torch::kFloat);
  float* h = scratch.data_ptr<float>();  // LayerNorm output (B, C)
  float* qkv = h + B * C;                // (B, 3C)
  float* att = qkv + B * 3 * C;          // attention output (B, C)
  float* fc = att + B * C;               // MLP hidden (B, 4C)
  float* proj = fc + B * 4 * C;          // a projection before it joins the residual (B, C)
  const Epilogue add{Epilogue::ADD, xs}, gelu{Epilogue::GELU};
  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* p = params.data() + 16 * l;
    layer_norm_rows(xs, B, C, data_or_null(p[0]), data_or_null(p[1]), (float)eps, h);
    block_linear(h, B, C, p[2], p[3], p[4], qkv);
    float* kp = k[l].data_ptr<float>();
    float* vp = v[l].data_ptr<float>();
    const int64_t sb = k[l].stride(0), sh = k[l].stride(1), st = k[l].stride(2);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t r = rp ? rp[b] : b;
      for (int64_t i = 0; i < n_head; ++i) {
        std::memcpy(kp + r * sb + i * sh + pp[b] * st, qkv + b * 3 * C + C + i * hs, hs * sizeof(float));
        std::memcpy(vp + r * sb + i * sh + pp[b] * st, qkv + b * 3 * C + 2 * C + i * hs, hs * sizeof(float));
      }
    }
    attend_rows(qkv, 3 * C, k[l], v[l], rp, lengths.data(), B, n_head, 1, hs, att);
    block_linear(att, B, C, p[5], p[6], p[7], proj, add);  // x += attn
    layer_norm_rows(xs, B, C, data_or_null(p[8]), data_or_null(p[9]), (float)eps, h);
    block_linear(h, B, C, p[10], p[11], p[12], fc, gelu);
    block_linear(fc, B, 4 * C, p[13], p[14], p[15], proj, add);  // x += mlp
  }
}

// x (B, C) embedded inputs -> the residual stream after the last block (run_layers).
torch::Tensor decode_layers(torch::Tensor x, std::vector<torch::Tensor> params, std::vector<torch::Tensor> k,
                            std::vector<torch::Tensor> v, torch::Tensor pos, torch::Tensor rows, int64_t n_head,
                            double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "decode_layers: x must be (B, C) fp32");
  auto out = x.contiguous().clone();  // the residual stream, updated in place layer by layer
  run_layers(out.data_ptr<float>(), x.size(0), x.size(1), params, k, v, pos, rows, n_head, eps);
  return out;
}

// A whole decode step of an inference model, token ids to logits, in one call (the Python ops
// around decode_layers cost ~0.5 ms a token, 15% of an int8 124M step): the token embedding
// (wte (V, C) fp32; or, int8, the packed head's columns, as cpu_kernels.unpack_columns reads them)
// plus the position's, every block (run_layers), ln_f, and the output projection: head is (C, V)
// fp32 or the int8 packed (tiles, Kp/2, TILE, 2) with head_scale (V,). ids, pos: (B,) long.
// Returns the logits (B, V).
torch::Tensor decode_step(torch::Tensor ids, torch::Tensor pos, torch::Tensor wte, torch::Tensor wpe,
                          std::vector<torch::Tensor> params, std::vector<torch::Tensor> k, std::vector<torch::Tensor> v,
                          torch::Tensor ln_w, torch::Tensor ln_b, torch::Tensor head, torch::Tensor head_scale,
                          int64_t n_head, double eps) {
  const bool int8 = head.scalar_type() == torch::kChar;
  const int64_t B = ids.numel(), C = wpe.size(1), V = int8 ? head_scale.numel() : head.size(1);
  TORCH_CHECK(ids.scalar_type() == torch::kLong && ids.is_contiguous() && pos.numel() == B &&
              wpe.is_contiguous() && head.is_contiguous() && (int8 ? head.dim() == 4 : head.size(0) == C) &&
              (int8 || (wte.is_contiguous() && wte.size(1) == C)), "decode_step: bad arguments");
  TORCH_CHECK(int8 || FAST_PATH, "decode_step: fp32 needs AVX-512");
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  auto x = torch::empty({B, C}, torch::kFloat);
  float* xs = x.data_ptr<float>();
  const float* pe = wpe.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(0 <= id[b] && id[b] < V && 0 <= pp[b] && pp[b] < wpe.size(0), "decode_step: id or position out of range");
    float* xb = xs + b * C;
    const float* pb = pe + pp[b] * C;
    if (int8) {  // column id of the packed head: inputs 2 kp and 2 kp + 1 sit side by side in its tile
      const int8_t* col = head.data_ptr<int8_t>() + (id[b] / TILE) * head.size(1) * TILE * 2 + (id[b] % TILE) * 2;
      const float s = head_scale.data_ptr<float>()[id[b]];
      for (int64_t c = 0; c < C; ++c) xb[c] = (float)col[(c / 2) * TILE * 2 + c % 2] * s + pb[c];
    } else {
      const float* row = wte.data_ptr<float>() + id[b] * C;
      for (int64_t c = 0; c < C; ++c) xb[c] = row[c] + pb[c];
    }
  }
  run_layers(xs, B, C, params, k, v, pos, torch::empty({0}, torch::kLong), n_head, eps);
  auto h = torch::empty({B, C}, torch::kFloat);
  layer_norm_rows(xs, B, C, data_or_null(ln_w), data_or_null(ln_b), (float)eps, h.data_ptr<float>());
  auto logits = torch::empty({B, V}, torch::kFloat);
  if (int8) {
    int8_linear(h.data_ptr<float>(), B, C, head.data_ptr<int8_t>(), head.size(0), head.size(1) * 2,
                head_scale.data_ptr<float>(), nullptr, V, logits.data_ptr<float>(), Epilogue{});
  } else {
#if FAST_PATH
    f32_linear(h.data_ptr<float>(), B, C, head.data_ptr<float>(), V, nullptr, logits.data_ptr<float>(), Epilogue{});
#endif
  }
  return logits;
}

// The largest of x[0:n] (n >= 1), one vectorised pass.
static float max_of(const float* x, int64_t n) {
  float m = -INFINITY;
  int64_t i = 0;
#if FAST_PATH
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (; i + 16 <= n; i += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(x + i));
  m = _mm512_reduce_max_ps(vmax);
#endif
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// The index of each row's largest value, the first where several tie (torch's argmax): (B, V)
// fp32 -> (B,) long, for rows without NaN. One vectorised pass; torch's max(dim) takes ~30-100 us
// for a row of 50,257.
torch::Tensor argmax_rows(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.stride(1) == 1 && x.size(1) > 0,
              "argmax_rows: (B, V) fp32 rows");
  const int64_t B = x.size(0), n = x.size(1);
  auto out = torch::empty({B}, torch::kLong);
  for (int64_t b = 0; b < B; ++b) {
    const float* r = x.data_ptr<float>() + b * x.stride(0);
    const float m = max_of(r, n);
    int64_t at = 0;
    while (at < n - 1 && !(r[at] == m)) ++at;  // the first that holds the maximum
    out.data_ptr<int64_t>()[b] = at;
  }
  return out;
}

// sample: the token drawn from softmax(logits / temperature) at u in [0, 1) by inverse CDF. One
// exp per logit with a float sum per span of 1024, then a scan of the span the draw falls in;
// torch takes a divide, a softmax and a cumsum, a pass over all 50,257 logits each (~80 us a token, docs/performance.md).
int64_t sample(torch::Tensor logits, double temperature, double u) {
  TORCH_CHECK(logits.dim() == 1 && logits.scalar_type() == torch::kFloat && logits.is_contiguous() && logits.numel() > 0,
              "sample: logits must be a non-empty contiguous 1-d float tensor");
  constexpr int64_t SPAN = 1024;
  const float* x = logits.data_ptr<float>();
  const int64_t n = logits.numel(), spans = (n + SPAN - 1) / SPAN;
  const float m = max_of(x, n);
  const float a = (float)(1.0 / temperature);
  thread_local std::vector<float> p;  // reused: a fresh 200 kB buffer a token would be mmapped and faulted in
  thread_local std::vector<double> sums;
  p.resize(n);
  sums.resize(spans);
  double total = 0;
  for (int64_t s = 0; s < spans; ++s) {
    const int64_t i0 = s * SPAN, i1 = std::min(n, i0 + SPAN);
    int64_t i = i0;
    float sum = 0.f;
#if FAST_PATH
    const __m512 vm = _mm512_set1_ps(m), va = _mm512_set1_ps(a), floor = _mm512_set1_ps(-87.f);
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= i1; i += 16) {
      const __m512 z = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm), va);
      const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z, floor, _CMP_GE_OQ), exp_neg(z));  // e^-87 and below: 0
      _mm512_storeu_ps(p.data() + i, e);
      acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; i < i1; ++i) {
      const float z = (x[i] - m) * a;
      p[i] = z >= -87.f ? std::exp(z) : 0.f;
      sum += p[i];
    }
    sums[s] = sum;
    total += sum;
  }
  const double target = u * total;
  double below = 0;  // mass of the spans before s
  int64_t s = 0;
  while (s + 1 < spans && below + sums[s] <= target) below += sums[s++];
  int64_t last = -1;  // the span's last token with any mass: where rounding leaves the draw unplaced
  for (int64_t i = s * SPAN; i < std::min(n, (s + 1) * SPAN); ++i) {
    if (p[i] == 0.f) continue;
    below += p[i];
    if (below > target) return i;
    last = i;
  }
  if (last >= 0) return last;
  for (int64_t i = n - 1; i >= 0; --i)  // only where the logits hold NaN: torch's path gives the last token too
    if (p[i] > 0.f) return i;
  return n - 1;
}

// Every kernel lets go of the GIL while it runs (its arguments are converted before, its result
// after): CPython hands the GIL to a waiting thread only after a 5 ms switch interval, so a kernel
// holding it would keep the server's request threads (a streamed token's write, a new request's
// parsing) waiting for the engine's decode step to end (docs/performance.md).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("mm_int8", &mm_int8, nogil);
  m.def("mm_f32", &mm_f32, nogil);
  m.def("attend", &attend, nogil);
  m.def("decode_layers", &decode_layers, nogil);
  m.def("decode_step", &decode_step, nogil);
  m.def("argmax_rows", &argmax_rows, nogil);
  m.def("sample", &sample, nogil);
  m.def("fast_path", &fast_path);
}
