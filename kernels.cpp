// CPU kernels for decoding, where PyTorch's stock kernels fall short (bench/decode.py):
//   mm_int8: x @ W with W int8 per output column and x quantized to int16 per block of 32 on the
//            fly; AVX-512 VNNI dot products (a portable loop elsewhere).
//   mm_f32:  x @ W in fp32 for the few rows of a batched decode step, straight from W's (in, out)
//            layout, so no packed copy of the weights is needed.
//   attend:  attention of decode steps (and drafts) over the KV cache.
//   decode_layers: a whole decode step through every block, the ops above plus ATen's LayerNorm
//            and GELU, in one call from Python (per-op dispatch from Python cost ~2 ms a token).
// Built by kernels.py with -march=native on the machine that runs it.
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

// y (M, N) = (x @ W) * scale + bias. wq: (N/TILE, Kp/2, TILE, 2) int8 round(W / scale).
torch::Tensor mm_int8(torch::Tensor x, torch::Tensor wq, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                      int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous fp32 (M, K)");
  const int64_t M = x.size(0), K = x.size(1), Kp = wq.size(1) * 2;
  TORCH_CHECK(K <= Kp && Kp % BLOCK == 0 && wq.size(0) * TILE >= N, "x and the packed weight disagree in shape");
  QRows r;
  quantize_rows(x.data_ptr<float>(), M, K, Kp, r);
  auto y = torch::empty({M, N}, x.options());
  const int8_t* wp = wq.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, wq.size(0), 1, [&](int64_t t0, int64_t t1) {
    float acc[4 * TILE];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * TILE, nn = std::min<int64_t>(TILE, N - n0);
      for (int64_t m = 0; m < M;) {
        const int mb = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
        if (mb == 4) int8_tile<4>(r, m, Kp, wp + t * Kp * TILE, acc);
        else if (mb == 2) int8_tile<2>(r, m, Kp, wp + t * Kp * TILE, acc);
        else int8_tile<1>(r, m, Kp, wp + t * Kp * TILE, acc);
        for (int i = 0; i < mb; ++i)
          for (int64_t n = 0; n < nn; ++n)
            yp[(m + i) * N + n0 + n] = acc[i * TILE + n] * sp[n0 + n] + (bp ? bp[n0 + n] : 0.f);
        m += mb;
      }
    }
  });
  return y;
}

#if FAST_PATH
// y[i, 0:TILE] = x[i] @ w[:, 0:TILE] * 1 + bias for MB rows; w row-major (K, N).
template <int MB>
static void f32_tile(const float* x, int64_t K, const float* w, int64_t N, const float* b, float* y) {
  __m512 acc[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[4];
    for (int v = 0; v < 4; ++v) wv[v] = _mm512_loadu_ps(w + k * N + 16 * v);
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * K + k]);
      for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_fmadd_ps(xv, wv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < 4; ++v)
      _mm512_storeu_ps(y + i * N + 16 * v, b ? _mm512_add_ps(acc[i][v], _mm512_loadu_ps(b + 16 * v)) : acc[i][v]);
}

// Eight rows (a batch's decode step) over 48 columns: 24 accumulators, so w is read from memory
// once for all eight rows (two passes of f32_tile<4> read it twice), +5-20%.
constexpr int TILE8 = 48;
static void f32_tile8(const float* x, int64_t K, const float* w, int64_t N, const float* b, float* y) {
  constexpr int V = TILE8 / 16;
  __m512 acc[8][V];
  for (int i = 0; i < 8; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[V];
    for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_ps(w + k * N + 16 * v);
    for (int i = 0; i < 8; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * K + k]);
      for (int v = 0; v < V; ++v) acc[i][v] = _mm512_fmadd_ps(xv, wv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < 8; ++i)
    for (int v = 0; v < V; ++v)
      _mm512_storeu_ps(y + i * N + 16 * v, b ? _mm512_add_ps(acc[i][v], _mm512_loadu_ps(b + 16 * v)) : acc[i][v]);
}

// One row (a single stream's decode step) over two tiles at once: longer runs of each weight row
// and a prefetch 8 rows ahead keep more of memory's bandwidth busy (+5-10% over f32_tile<1>).
static void f32_row_wide(const float* x, int64_t K, const float* w, int64_t N, const float* b, float* y) {
  constexpr int V = 2 * TILE / 16;
  __m512 acc[2][V];
  for (int u = 0; u < 2; ++u)
    for (int v = 0; v < V; ++v) acc[u][v] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    _mm_prefetch((const char*)(w + (k + 8) * N), _MM_HINT_T0);
    _mm_prefetch((const char*)(w + (k + 8) * N + 64), _MM_HINT_T0);
    for (int u = 0; u < 2; ++u) {
      const __m512 xv = _mm512_set1_ps(x[k + u]);
      for (int v = 0; v < V; ++v) acc[u][v] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + (k + u) * N + 16 * v), acc[u][v]);
    }
  }
  for (; k < K; ++k) {
    const __m512 xv = _mm512_set1_ps(x[k]);
    for (int v = 0; v < V; ++v) acc[0][v] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + k * N + 16 * v), acc[0][v]);
  }
  for (int v = 0; v < V; ++v) {
    const __m512 sum = _mm512_add_ps(acc[0][v], acc[1][v]);
    _mm512_storeu_ps(y + 16 * v, b ? _mm512_add_ps(sum, _mm512_loadu_ps(b + 16 * v)) : sum);
  }
}
#endif

// y (M, N) = x @ w + bias, w (K, N) fp32 as stored: for a few rows (batched decode).
torch::Tensor mm_f32(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(FAST_PATH, "mm_f32 needs AVX-512; use addmm");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous() && x.size(1) == w.size(0), "shapes");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(1), tiles = N / TILE;
  auto y = torch::empty({M, N}, x.options());
#if FAST_PATH
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // rows 8 at a time (48-column tiles), then the rest: one row over pairs of 64-column tiles, or
  // 4, 2 and 1 rows over 64-column tiles
  const int64_t M8 = M / 8 * 8, tiles8 = N / TILE8, wide = M - M8 == 1 ? tiles / 2 : 0;
  if (M8)
    at::parallel_for(0, tiles8, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t m = 0; m < M8; m += 8)
          f32_tile8(xp + m * K, K, wp + t * TILE8, N, bp ? bp + t * TILE8 : nullptr, yp + m * N + t * TILE8);
    });
  if (M8 < M) {
    const float* xr = xp + M8 * K;
    float* yr = yp + M8 * N;
    at::parallel_for(0, wide, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        f32_row_wide(xr, K, wp + 2 * TILE * t, N, bp ? bp + 2 * TILE * t : nullptr, yr + 2 * TILE * t);
    });
    at::parallel_for(2 * wide, tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t * TILE;
        int64_t m = M8;
        for (; m + 4 <= M; m += 4) f32_tile<4>(xp + m * K, K, wp + n, N, bp ? bp + n : nullptr, yp + m * N + n);
        for (; m + 2 <= M; m += 2) f32_tile<2>(xp + m * K, K, wp + n, N, bp ? bp + n : nullptr, yp + m * N + n);
        for (; m < M; ++m) f32_tile<1>(xp + m * K, K, wp + n, N, bp ? bp + n : nullptr, yp + m * N + n);
      }
    });
  }
  for (int64_t m = 0; m < M; ++m)  // columns past the last whole tile
    for (int64_t n = m < M8 ? tiles8 * TILE8 : tiles * TILE; n < N; ++n) {
      float acc = bp ? bp[n] : 0.f;
      for (int64_t k = 0; k < K; ++k) acc += xp[m * K + k] * wp[k * N + n];
      yp[m * N + n] = acc;
    }
#endif
  return y;
}

#if FAST_PATH
// exp(x) for x <= 0 (softmax after subtracting the maximum): 2^n * e^r with |r| <= ln2 / 2 and
// e^r to degree 6 (relative error ~1e-7). glibc's scalar expf was half of attend's time at batch 8.
static inline __m512 exp_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147181f), x);
  __m512 e = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(e, n);
}

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
// k, v: the KV cache (B, nh, T_cap, hs); slots past a row's length are never read (they may hold
// anything). torch's fused CPU attention takes ~2 ms a call for one query, its bmm path ~70 us.
torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lengths) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.stride(3) == 1 && v.stride(3) == 1 &&
              k.strides() == v.strides() && lengths.scalar_type() == torch::kLong, "attend: bad arguments");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  auto qc = q.contiguous();
  auto y = torch::empty_like(qc);
  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();
  const int64_t sb = k.stride(0), sh = k.stride(1), st = k.stride(2);
  const float scale = 1.f / std::sqrt((float)D);
  at::parallel_for(0, B * H * T, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * T), h = (i / T) % H, L = lp[b] + i % T;
      const float* qi = qp + i * D;
      const float* ki = kp + b * sb + h * sh;
      const float* vi = vp + b * sb + h * sh;
      p.resize(L + 16);
      float* yi = yp + i * D;
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
  return y;
}

// x @ W + b for one of the blocks' linears: fp32 (K, N) weights, or int8 packed with a scale per
// column. An empty bias tensor means none.
static torch::Tensor block_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                                  const torch::Tensor& b) {
  c10::optional<torch::Tensor> bias;
  if (b.numel()) bias = b;
  if (w.scalar_type() == torch::kChar) return mm_int8(x, w, scale, bias, scale.size(0));
  return mm_f32(x, w, bias);
}

// One decode step (a new token per row) through every block; x (B, C) is the embedded input.
// params: 16 tensors per layer: ln_1 weight, bias; c_attn; attn.c_proj; ln_2 weight, bias; c_fc;
// mlp.c_proj, each linear as weight (fp32 (in, out), or int8 packed), scale (int8 only, else
// empty), bias (empty when none). k[l], v[l]: the layer's cache (B, nh, T_cap, hs); row b's new key and value
// go to position pos[b], and its query sees positions 0..pos[b]. Exactly the ops of Block.forward.
torch::Tensor decode_layers(torch::Tensor x, std::vector<torch::Tensor> params, std::vector<torch::Tensor> k,
                            std::vector<torch::Tensor> v, torch::Tensor pos, int64_t n_head, double eps) {
  const int64_t B = x.size(0), C = x.size(1), hs = C / n_head, L = k.size();
  TORCH_CHECK(params.size() == 16 * (size_t)L && v.size() == (size_t)L && pos.numel() == B &&
              pos.scalar_type() == torch::kLong, "decode_layers: bad arguments");
  const auto lengths = pos + 1;
  const int64_t* pp = pos.data_ptr<int64_t>();
  auto opt = [](const torch::Tensor& t) { return t.numel() ? c10::optional<torch::Tensor>(t) : c10::nullopt; };
  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* p = params.data() + 16 * l;
    auto h = at::layer_norm(x, {C}, opt(p[0]), opt(p[1]), eps);
    auto qkv = block_linear(h, p[2], p[3], p[4]);  // (B, 3C)
    const float* src = qkv.data_ptr<float>();
    float* kp = k[l].data_ptr<float>();
    float* vp = v[l].data_ptr<float>();
    const int64_t sb = k[l].stride(0), sh = k[l].stride(1), st = k[l].stride(2);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < n_head; ++i) {
        std::memcpy(kp + b * sb + i * sh + pp[b] * st, src + b * 3 * C + C + i * hs, hs * sizeof(float));
        std::memcpy(vp + b * sb + i * sh + pp[b] * st, src + b * 3 * C + 2 * C + i * hs, hs * sizeof(float));
      }
    auto q = qkv.narrow(1, 0, C).reshape({B, n_head, 1, hs});
    auto y = attend(q, k[l], v[l], lengths).view({B, C});
    x = x + block_linear(y, p[5], p[6], p[7]);
    h = at::layer_norm(x, {C}, opt(p[8]), opt(p[9]), eps);
    x = x + block_linear(at::gelu(block_linear(h, p[10], p[11], p[12]), "tanh"), p[13], p[14], p[15]);
  }
  return x;
}
