// The MLP block's hidden layer after its linear layer, BatchNorm1d -> ReLU -> Dropout, in
// training on the CPU: two passes forward and two backward over the [rows, width]
// activations, where eager torch makes six forward and three backward, and dropout's mask
// drawn in the pass that applies it. Built on first use by recsys/models/fused.py, which
// says what each function computes; its NumPy twin of draw() is fused._draws.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace {

// rows a block: each block's column sums are float over its rows, and blocks are added in
// double, in order, so the result does not depend on the number of threads
constexpr int64_t kRows = 64;

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// element e's dropout draw: 32 bits from the element's index and the call's 64-bit seed
inline uint32_t draw(uint32_t e, uint32_t k1, uint32_t k2) { return mix32(mix32(e + k1) ^ k2); }

template <typename F>
void for_blocks(int64_t rows, const F& f) {
  const int64_t nb = (rows + kRows - 1) / kRows;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b, b * kRows, std::min(rows, (b + 1) * kRows));
  });
}

void check_cut(int64_t cut) {
  TORCH_CHECK(cut >= 0 && cut <= int64_t(UINT32_MAX), "cut ", cut, " out of [0, 2^32): 2^32 drops everything");
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
}

// The passes over one block of rows, rows [r0, r1) of width c. Functions of their own, with
// every pointer and key a parameter: inside at::parallel_for's OpenMP region the captured
// locals are memory the stores might alias, and the loops would not vectorize.

// keep[e] = draw(e) >= ct for e in [a, b)
void keep_range(bool* __restrict o, int64_t a, int64_t b, uint32_t k1, uint32_t k2, uint32_t ct) {
  for (int64_t e = a; e < b; ++e) o[e] = draw(uint32_t(e), k1, k2) >= ct;
}

// the block's column sums of x - K and of its square (K: x's first row)
void sums_x(const float* __restrict X, const float* __restrict K, float* __restrict S, float* __restrict Q,
            int64_t c, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    const float* __restrict xi = X + i * c;
    for (int64_t j = 0; j < c; ++j) {
      const float v = xi[j] - K[j];
      S[j] += v;
      Q[j] += v * v;
    }
  }
}

// y = relu(((x - K) - O) A + D), zeroed where the element's draw is below ct (ct 0: kept)
void forward_rows(const float* __restrict X, const float* __restrict K, const float* __restrict O,
                  const float* __restrict A, const float* __restrict D, float* __restrict Y, int64_t c, int64_t r0,
                  int64_t r1, uint32_t k1, uint32_t k2, uint32_t ct) {
  for (int64_t i = r0; i < r1; ++i) {
    const float* __restrict xi = X + i * c;
    float* __restrict yi = Y + i * c;
    if (ct) {
      const uint32_t e0 = uint32_t(i * c);
      for (int64_t j = 0; j < c; ++j) {
        const float z = ((xi[j] - K[j]) - O[j]) * A[j] + D[j];
        yi[j] = (z > 0.f && draw(e0 + uint32_t(j), k1, k2) >= ct) ? z : 0.f;
      }
    } else {
      for (int64_t j = 0; j < c; ++j) {
        const float z = ((xi[j] - K[j]) - O[j]) * A[j] + D[j];
        yi[j] = z > 0.f ? z : 0.f;
      }
    }
  }
}

// the block's column sums of g = grad where y > 0, and of g ((x - K) - O)
void sums_grad(const float* __restrict G, const float* __restrict X, const float* __restrict Y,
               const float* __restrict K, const float* __restrict O, float* __restrict SG, float* __restrict SX,
               int64_t c, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    const float *__restrict gi = G + i * c, *__restrict xi = X + i * c, *__restrict yi = Y + i * c;
    for (int64_t j = 0; j < c; ++j) {
      const float g = yi[j] > 0.f ? gi[j] : 0.f;
      SG[j] += g;
      SX[j] += g * ((xi[j] - K[j]) - O[j]);
    }
  }
}

// gx = A g + BX ((x - K) - O) + D, g = grad where y > 0
void backward_rows(const float* __restrict G, const float* __restrict X, const float* __restrict Y,
                   const float* __restrict K, const float* __restrict O, const float* __restrict A,
                   const float* __restrict BX, const float* __restrict D, float* __restrict GX, int64_t c,
                   int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    const float *__restrict gi = G + i * c, *__restrict xi = X + i * c, *__restrict yi = Y + i * c;
    float* __restrict o = GX + i * c;
    for (int64_t j = 0; j < c; ++j) {
      const float g = yi[j] > 0.f ? gi[j] : 0.f;
      o[j] = A[j] * g + BX[j] * ((xi[j] - K[j]) - O[j]) + D[j];
    }
  }
}

// TorchRec's row-wise Adagrad on rows [r0, r1) of one [rows, d] table, as its ops round:
// S += sum(g^2) / d, then w + (-lr g) / (sqrt(S) + eps)
void adagrad_rows(float* __restrict W, const float* __restrict G, float* __restrict S, int64_t d, int64_t r0,
                  int64_t r1, float nlr, float eps) {
  for (int64_t i = r0; i < r1; ++i) {
    const float* __restrict gi = G + i * d;
    float* __restrict wi = W + i * d;
    float acc = 0.f;
    for (int64_t j = 0; j < d; ++j) acc += gi[j] * gi[j];
    const float s = S[i] + acc / float(d);
    S[i] = s;
    const float std = std::sqrt(s) + eps;
    for (int64_t j = 0; j < d; ++j) wi[j] = wi[j] + nlr * gi[j] / std;
  }
}

}  // namespace

// keep[e] = draw(e) >= cut, for e in [0, n)
torch::Tensor keep(int64_t n, int64_t seed, int64_t cut) {
  TORCH_CHECK(n >= 0 && n <= int64_t(UINT32_MAX), "at most 2^32 - 1 elements");
  check_cut(cut);
  auto out = torch::empty({n}, torch::kBool);
  bool* o = out.data_ptr<bool>();
  const uint32_t k1 = uint32_t(seed), k2 = uint32_t(uint64_t(seed) >> 32), ct = uint32_t(cut);
  at::parallel_for(0, n, 1 << 16, [&](int64_t a, int64_t b) { keep_range(o, a, b, k1, k2, ct); });
  return out;
}

// y = relu(s (w (x - mean) invstd + b)), zeroed where draw < cut (cut 0: no dropout).
// Returns y, the batch's mean and invstd, its unbiased variance (for running_var), and
// the mean less x's first row (for backward: x - mean is taken as (x - x[0]) - that, which
// keeps its digits where the mean is large against the spread).
std::vector<torch::Tensor> forward(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& bias,
                                   double eps, double s, int64_t cut, int64_t seed) {
  check(x, "x");
  check(w, "weight");
  check(bias, "bias");
  check_cut(cut);
  TORCH_CHECK(x.dim() == 2 && x.size(0) > 1 && x.numel() <= int64_t(UINT32_MAX), "x: [rows > 1, width], under 2^32 elements");
  const int64_t n = x.size(0), c = x.size(1), nb = (n + kRows - 1) / kRows;
  const float* X = x.data_ptr<float>();
  // sums of x - x[0]: x's first row is near the mean, so the variance does not cancel
  std::vector<double> part(size_t(nb) * 2 * c);
  const float* K = X;
  for_blocks(n, [&](int64_t b, int64_t r0, int64_t r1) {
    std::vector<float> s1(c, 0.f), s2(c, 0.f);
    sums_x(X, K, s1.data(), s2.data(), c, r0, r1);
    std::copy(s1.begin(), s1.end(), part.begin() + b * 2 * c);
    std::copy(s2.begin(), s2.end(), part.begin() + b * 2 * c + c);
  });
  auto mean = torch::empty({c}, torch::kFloat), invstd = torch::empty({c}, torch::kFloat),
       var = torch::empty({c}, torch::kFloat), off = torch::empty({c}, torch::kFloat);
  float *Mo = mean.data_ptr<float>(), *Io = invstd.data_ptr<float>(), *Vo = var.data_ptr<float>(),
        *Oo = off.data_ptr<float>();
  const float *W = w.data_ptr<float>(), *Bi = bias.data_ptr<float>();
  std::vector<float> a(c), d(c);
  for (int64_t j = 0; j < c; ++j) {
    double S = 0, Q = 0;
    for (int64_t b = 0; b < nb; ++b) {
      S += part[b * 2 * c + j];
      Q += part[b * 2 * c + c + j];
    }
    const double dm = S / n, m = dm + K[j], v = std::max(Q / n - dm * dm, 0.0), is = 1.0 / std::sqrt(v + eps);
    Mo[j] = float(m);
    Oo[j] = float(dm);
    Io[j] = float(is);
    Vo[j] = float(v * n / (n - 1));
    a[j] = float(s * W[j] * is);
    d[j] = float(s * Bi[j]);
  }
  auto y = torch::empty_like(x);
  float* Y = y.data_ptr<float>();
  const uint32_t k1 = uint32_t(seed), k2 = uint32_t(uint64_t(seed) >> 32), ct = uint32_t(cut);
  const float *A = a.data(), *D = d.data();
  for_blocks(n, [&](int64_t, int64_t r0, int64_t r1) { forward_rows(X, K, Oo, A, D, Y, c, r0, r1, k1, k2, ct); });
  return {y, mean, invstd, var, off};
}

// The gradients of x, w and b from the output's gradient: g = grad where y > 0 (the ReLU
// passed and the mask kept), then batch norm's backward with weight s w.
std::vector<torch::Tensor> backward(const torch::Tensor& grad, const torch::Tensor& x, const torch::Tensor& y,
                                    const torch::Tensor& w, const torch::Tensor& off, const torch::Tensor& invstd,
                                    double s) {
  for (auto* t : {&grad, &x, &y, &w, &off, &invstd}) check(*t, "a saved tensor");
  const int64_t n = x.size(0), c = x.size(1), nb = (n + kRows - 1) / kRows;
  const float *G = grad.data_ptr<float>(), *X = x.data_ptr<float>(), *Y = y.data_ptr<float>();
  const float *O = off.data_ptr<float>(), *IS = invstd.data_ptr<float>(), *W = w.data_ptr<float>();
  const float* K = X;
  std::vector<double> part(size_t(nb) * 2 * c);
  for_blocks(n, [&](int64_t b, int64_t r0, int64_t r1) {
    std::vector<float> s1(c, 0.f), s2(c, 0.f);
    sums_grad(G, X, Y, K, O, s1.data(), s2.data(), c, r0, r1);
    std::copy(s1.begin(), s1.end(), part.begin() + b * 2 * c);
    std::copy(s2.begin(), s2.end(), part.begin() + b * 2 * c + c);
  });
  auto gw = torch::empty({c}, torch::kFloat), gb = torch::empty({c}, torch::kFloat);
  float *GW = gw.data_ptr<float>(), *GB = gb.data_ptr<float>();
  std::vector<float> a(c), bx(c), d(c);
  for (int64_t j = 0; j < c; ++j) {
    double sg = 0, sx = 0;
    for (int64_t b = 0; b < nb; ++b) {
      sg += part[b * 2 * c + j];
      sx += part[b * 2 * c + c + j];
    }
    // gx = a (g - sg / n - (x - mean) invstd^2 sx / n), a = s w invstd
    const double is = IS[j], aj = s * W[j] * is, bj = -aj * is * is * sx / n;
    GW[j] = float(s * sx * is);
    GB[j] = float(s * sg);
    a[j] = float(aj);
    bx[j] = float(bj);
    d[j] = float(-aj * sg / n);
  }
  auto gx = torch::empty_like(x);
  float* GX = gx.data_ptr<float>();
  const float *A = a.data(), *BX = bx.data(), *D = d.data();
  for_blocks(n, [&](int64_t, int64_t r0, int64_t r1) { backward_rows(G, X, Y, K, O, A, BX, D, GX, c, r0, r1); });
  return {gx, gw, gb};
}

// Row-wise Adagrad's step for every table at once (recsys.training.optim): tables of
// [rows, d] weights, their gradients and [rows, 1] sums, in blocks of rows on torch's threads.
// False, and nothing touched, unless every one is a contiguous float32 CPU tensor of those
// shapes (the caller then takes torch's ops).
bool rowwise_adagrad(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& grads,
                     const std::vector<torch::Tensor>& sums, double lr, double eps) {
  TORCH_CHECK(params.size() == grads.size() && params.size() == sums.size(), "one gradient and sum a table");
  auto plain = [](const torch::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous();
  };
  for (size_t t = 0; t < params.size(); ++t) {
    if (!plain(params[t]) || !plain(grads[t]) || !plain(sums[t]) || params[t].dim() != 2 ||
        grads[t].sizes() != params[t].sizes() || sums[t].numel() != params[t].size(0))
      return false;
  }
  constexpr int64_t kBlock = 1024;
  std::vector<std::array<int64_t, 3>> blocks;  // table, first row, end
  for (size_t t = 0; t < params.size(); ++t) {
    for (int64_t r = 0; r < params[t].size(0); r += kBlock)
      blocks.push_back({int64_t(t), r, std::min(params[t].size(0), r + kBlock)});
  }
  const float nlr = float(-lr), ep = float(eps);
  at::parallel_for(0, int64_t(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto& [t, r0, r1] = blocks[b];
      adagrad_rows(params[t].data_ptr<float>(), grads[t].data_ptr<float>(), sums[t].data_ptr<float>(),
                   params[t].size(1), r0, r1, nlr, ep);
    }
  });
  return true;
}

// how many threads at::parallel_for runs n blocks on in this build (one where it was built
// without OpenMP: the pragma in torch's header is then ignored)
int64_t workers(int64_t n) {
  std::vector<int> used(std::max(at::get_num_threads(), 1), 0);
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { used[at::get_thread_num()] = 1; });
  return std::accumulate(used.begin(), used.end(), int64_t(0));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("workers", &workers);
  m.def("keep", &keep);
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("rowwise_adagrad", &rowwise_adagrad);
}
