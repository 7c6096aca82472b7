// The universal hash family of compression/hashing.py (Carter-Wegman over p = 2^31 - 1) on the
// CPU in one pass: each id split into its limbs once, then every function asked of it, where the
// torch ops make five passes over the ids and three over their [n, H] products. The same integers
// as the torch ops (tested against them). Built on first use by compression/native.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <optional>

namespace {

constexpr int64_t kPrime = (int64_t(1) << 31) - 1;
constexpr int64_t kShift = int64_t(1) << 33;  // makes floor(x / p) non-negative for every int64 x
constexpr int64_t kLowBits = (int64_t(1) << 30) - 1;

struct Limbs {
  int64_t r, l1, l2;
};

// x = q p + r with r in [0, p) (Euclidean), u = q + 2^33 split as l2 2^30 + l1.
inline Limbs limbs(int64_t x) {
  int64_t q = x / kPrime, r = x % kPrime;
  if (r < 0) {
    r += kPrime;
    q -= 1;
  }
  const int64_t u = q + kShift;
  return {r, u & kLowBits, u >> 30};
}

// (a0 r + a1 l1 + a2 l2 + b) mod p mod m: every coefficient below p keeps the sum below 2^63.
inline int64_t hash(const int64_t* c, const Limbs& v, int64_t m) {
  const int64_t g = (c[0] * v.r + c[1] * v.l1 + c[2] * v.l2 + c[3]) % kPrime;
  return m <= kPrime ? int64_t(uint32_t(g) % uint32_t(m)) : g;  // g < p: a larger m leaves it
}

bool plain_long(const torch::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == torch::kLong && t.is_contiguous();
}

}  // namespace

// Hash ids (any shape, contiguous) with the functions of coeffs ([H, 4]: a0, a1, a2, b) into
// [0, m): every function (which < 0; out [*ids.shape, H]), function `which`, or per id the
// function which_per_id[i] (out ids.shape). m: the int `m`, or where m is 0 per id
// m_per_id[i] (per id and function with every function: m_per_id[i] for all of id i's).
// Undefined, and nothing computed, unless every tensor is a contiguous int64 CPU tensor of the
// sizes this needs, every coefficient, function index and modulus in range.
torch::Tensor universal_hash(const torch::Tensor& ids, const torch::Tensor& coeffs, int64_t which,
                             const std::optional<torch::Tensor>& which_per_id, int64_t m,
                             const std::optional<torch::Tensor>& m_per_id) {
  if (!plain_long(ids) || !plain_long(coeffs) || coeffs.dim() != 2 || coeffs.size(1) != 4 || coeffs.size(0) < 1)
    return {};
  const int64_t n = ids.numel(), h = coeffs.size(0);
  const int64_t* c = coeffs.data_ptr<int64_t>();
  for (int64_t i = 0; i < 4 * h; ++i)
    if (c[i] < 0 || c[i] >= kPrime) return {};
  const int64_t* fn = nullptr;
  if (which_per_id) {
    if (!plain_long(*which_per_id) || which_per_id->numel() != n) return {};
    fn = which_per_id->data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i)
      if (fn[i] < 0 || fn[i] >= h) return {};
  } else if (which >= h) {
    return {};
  }
  const int64_t* mod = nullptr;
  if (m == 0) {
    if (!m_per_id || !plain_long(*m_per_id) || m_per_id->numel() != n) return {};
    mod = m_per_id->data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i)
      if (mod[i] < 1) return {};
  } else if (m < 1) {
    return {};
  }
  const bool all = !fn && which < 0;
  auto sizes = ids.sizes().vec();
  if (all) sizes.push_back(h);
  auto out = torch::empty(sizes, ids.options());
  const int64_t* x = ids.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, n, all ? std::max<int64_t>(1, 8192 / h) : 8192, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Limbs v = limbs(x[i]);
      const int64_t mi = mod ? mod[i] : m;
      if (all) {
        for (int64_t j = 0; j < h; ++j) o[i * h + j] = hash(c + 4 * j, v, mi);
      } else {
        o[i] = hash(c + 4 * (fn ? fn[i] : which), v, mi);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("universal_hash", &universal_hash);
}
