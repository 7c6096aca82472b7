// Hashing on the CPU, built on first use by compression/native.py; each computes what its torch
// ops compute (tested against them):
// - the universal hash family of compression/hashing.py (Carter-Wegman over p = 2^31 - 1) in one
//   pass: each id split into its limbs once, then every function asked of it, where the torch ops
//   make five passes over the ids and three over their [n, H] products;
// - CAFE's HotSketch (compression/methods/cafe.py): a step's counts and every id's exact slot,
//   where the torch ops sort the ids twice and make some twenty passes.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <unordered_map>
#include <vector>

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

namespace {

// The sketch's tensors as CafeCollection holds them: keys [B, S] int64, scores [B, S] float32,
// slot [B, S] int32; the ids, their buckets (int64, in [0, B) where coded) and which are coded.
bool plain_sketch(const torch::Tensor& ids, const torch::Tensor& bucket, const torch::Tensor& coded,
                  const torch::Tensor& keys, const torch::Tensor* scores, const torch::Tensor& slot) {
  const int64_t n = ids.numel();
  if (!plain_long(ids) || !plain_long(bucket) || bucket.numel() != n || !coded.device().is_cpu() ||
      coded.scalar_type() != torch::kBool || !coded.is_contiguous() || coded.numel() != n)
    return false;
  if (!plain_long(keys) || keys.dim() != 2 || !slot.device().is_cpu() || slot.scalar_type() != torch::kInt ||
      !slot.is_contiguous() || slot.sizes() != keys.sizes())
    return false;
  if (scores && (!scores->device().is_cpu() || scores->scalar_type() != torch::kFloat ||
                 !scores->is_contiguous() || scores->sizes() != keys.sizes()))
    return false;
  const int64_t* b = bucket.data_ptr<int64_t>();
  const bool* c = coded.data_ptr<bool>();
  for (int64_t i = 0; i < n; ++i)
    if (c[i] && (b[i] < 0 || b[i] >= keys.size(0))) return false;
  return true;
}

}  // namespace

// One training step's coded ids into the sketch, as CafeCollection._count takes them: each
// distinct (bucket, id) pair counted; an id held in its bucket adds its count to its entry's
// score (the first entry holding it); per bucket the most frequent new id (ties: the smallest)
// replaces the bucket's lowest entry (the first of equal scores, after the adds) if its count
// beats that score: the new score is the old plus its count, its slot -1. False, and nothing
// touched, unless the tensors are as plain_sketch asks.
bool sketch_count(const torch::Tensor& ids, const torch::Tensor& bucket, const torch::Tensor& coded,
                  torch::Tensor& keys, torch::Tensor& scores, torch::Tensor& slot) {
  if (!plain_sketch(ids, bucket, coded, keys, &scores, slot)) return false;
  const int64_t n = ids.numel(), width = keys.size(1);
  const int64_t* x = ids.data_ptr<int64_t>();
  const int64_t* b = bucket.data_ptr<int64_t>();
  const bool* c = coded.data_ptr<bool>();
  int64_t* key = keys.data_ptr<int64_t>();
  float* score = scores.data_ptr<float>();
  int32_t* sl = slot.data_ptr<int32_t>();
  // the distinct pairs and their counts, in an open-addressing table
  size_t cap = 16;
  while (cap < 2 * size_t(n)) cap <<= 1;
  struct Pair {
    int64_t b = -1, x = 0, count = 0;
  };
  std::vector<Pair> pairs(cap);
  for (int64_t i = 0; i < n; ++i) {
    if (!c[i]) continue;
    size_t h = (uint64_t(x[i]) * 0x9e3779b97f4a7c15ULL ^ uint64_t(b[i]) * 0xc2b2ae3d27d4eb4fULL) >> 17;
    for (h &= cap - 1;; h = (h + 1) & (cap - 1)) {
      Pair& p = pairs[h];
      if (p.b < 0) p.b = b[i], p.x = x[i];
      if (p.b == b[i] && p.x == x[i]) {
        ++p.count;
        break;
      }
    }
  }
  std::vector<int64_t> touched;
  std::vector<float> best;  // per touched bucket, the most frequent new id's count and the id
  std::vector<int64_t> winner;
  std::unordered_map<int64_t, int64_t> at;  // bucket -> its place in touched (not one per bucket
  at.reserve(size_t(n));                     // of the sketch: a large table's are millions)
  for (const Pair& p : pairs) {
    if (p.b < 0) continue;
    int64_t* k = key + p.b * width;
    int64_t j = 0;
    while (j < width && k[j] != p.x) ++j;
    if (j < width) {
      score[p.b * width + j] += float(p.count);
      continue;
    }
    const auto [place, added] = at.try_emplace(p.b, int64_t(touched.size()));
    if (added) {
      touched.push_back(p.b);
      best.push_back(-1.0f);
      winner.push_back(0);
    }
    const int64_t t = place->second;
    const float cnt = float(p.count);
    if (cnt > best[t] || (cnt == best[t] && p.x < winner[t])) best[t] = cnt, winner[t] = p.x;
  }
  for (size_t t = 0; t < touched.size(); ++t) {
    const int64_t bk = touched[t];
    float* s = score + bk * width;
    int64_t low = 0;
    for (int64_t j = 1; j < width; ++j)
      if (s[j] < s[low]) low = j;
    if (best[t] > s[low]) {
      key[bk * width + low] = winner[t];
      s[low] = s[low] + best[t];
      sl[bk * width + low] = -1;
    }
  }
  return true;
}

// Each coded id's exact slot where its bucket holds it with one (the largest of its entries'
// slots), written into rows; other rows left as they are. False, and nothing touched, unless the
// tensors are as plain_sketch asks and rows is an int64 vector of the ids' length.
bool sketch_rows(const torch::Tensor& ids, const torch::Tensor& bucket, const torch::Tensor& coded,
                 const torch::Tensor& keys, const torch::Tensor& slot, torch::Tensor& rows) {
  if (!plain_sketch(ids, bucket, coded, keys, nullptr, slot) || !plain_long(rows) || rows.numel() != ids.numel())
    return false;
  const int64_t n = ids.numel(), width = keys.size(1);
  const int64_t* x = ids.data_ptr<int64_t>();
  const int64_t* b = bucket.data_ptr<int64_t>();
  const bool* c = coded.data_ptr<bool>();
  const int64_t* key = keys.data_ptr<int64_t>();
  const int32_t* sl = slot.data_ptr<int32_t>();
  int64_t* r = rows.data_ptr<int64_t>();
  at::parallel_for(0, n, 8192, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (!c[i]) continue;
      int32_t s = -1;
      for (int64_t j = 0; j < width; ++j)
        if (key[b[i] * width + j] == x[i]) s = std::max(s, sl[b[i] * width + j]);
      if (s >= 0) r[i] = s;
    }
  });
  return true;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("universal_hash", &universal_hash);
  m.def("sketch_count", &sketch_count);
  m.def("sketch_rows", &sketch_rows);
}
