// CPU kernels for decoding, where PyTorch's stock kernels fall short (bench/decode.py):
//   mm_int8: x @ W with W int8 per output column and x quantized to int16 per block of 32 on the
//            fly; AVX-512 VNNI dot products (a portable loop elsewhere).
//   mm_f32:  x @ W in fp32 for the few rows of a batched decode step, straight from W's (in, out)
//            layout, so no packed copy of the weights is needed.
//   attend:  attention of decode steps (and drafts) over the KV cache.
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
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * TILE;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) f32_tile<4>(xp + m * K, K, wp + n, N, bp ? bp + n : nullptr, yp + m * N + n);
      for (; m + 2 <= M; m += 2) f32_tile<2>(xp + m * K, K, wp + n, N, bp ? bp + n : nullptr, yp + m * N + n);
      for (; m < M; ++m) f32_tile<1>(xp + m * K, K, wp + n, N, bp ? bp + n : nullptr, yp + m * N + n);
    }
  });
  for (int64_t m = 0; m < M; ++m)  // columns past the last whole tile
    for (int64_t n = tiles * TILE; n < N; ++n) {
      float acc = bp ? bp[n] : 0.f;
      for (int64_t k = 0; k < K; ++k) acc += xp[m * K + k] * wp[k * N + n];
      yp[m * N + n] = acc;
    }
#endif
  return y;
}

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
      p.resize(L);
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
      float* yi = yp + i * D;
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
