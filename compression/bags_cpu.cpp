// Pooled lookups of a whole collection on the CPU: every feature's bags pooled into the
// output's layout in one call, and backward every table's gradient in one call, where TorchRec's
// unsharded collection runs an EmbeddingBag forward and backward for each feature (sorting the
// ids, building offsets) and torch's one-hot path a lookup, a copy and a backward for each.
// Built on first use by compression/native.py; compression/bags.py (pooled_lookup) says when
// it is used and checks it against TorchRec's collection.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

// The collection's features in the output's order. Feature f is the KJT's key pos[f]: its bag
// of sample b is values[offsets[pos[f] * batch + b] : offsets[pos[f] * batch + b + 1]], each id
// scaled by its per-sample weight where there are weights; its rows those of weights[table[f]],
// pooled by sum, or by mean where mean[f]; its columns start at the sum of the dims before it.
struct Bags {
  const int64_t* values;
  const int64_t* offsets;
  const float* scale;  // per-sample weights, or null
  int64_t batch;
  const std::vector<int64_t>& pos;
  const std::vector<int64_t>& table;
  const std::vector<bool>& mean;
  std::vector<int64_t> off;  // column offsets, one past the last: the output's width

  // bag b of feature f: [first, last) of values, and the factor of each of its rows
  void bag(size_t f, int64_t b, int64_t* first, int64_t* last, float* factor) const {
    const int64_t i = pos[f] * batch + b;
    *first = offsets[i];
    *last = offsets[i + 1];
    *factor = mean[f] && *last > *first ? 1.0f / float(*last - *first) : 1.0f;
  }
};

Bags bags(const torch::Tensor& values, const torch::Tensor& offsets, const std::optional<torch::Tensor>& weights_of_ids,
          int64_t batch,
          const std::vector<int64_t>& pos, const std::vector<int64_t>& table, const std::vector<bool>& mean,
          const std::vector<torch::Tensor>& weights) {
  const torch::Tensor scale = weights_of_ids.has_value() ? *weights_of_ids : torch::Tensor();
  auto plain_long = [](const torch::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == torch::kLong && t.is_contiguous() && t.dim() == 1;
  };
  TORCH_CHECK(plain_long(values) && plain_long(offsets), "pooled lookup: ids and offsets must be contiguous int64 CPU vectors");
  TORCH_CHECK(!scale.defined() || (scale.device().is_cpu() && scale.scalar_type() == torch::kFloat &&
                                   scale.is_contiguous() && scale.numel() == values.numel()),
              "pooled lookup: the per-sample weights must be a contiguous float32 vector, one an id");
  TORCH_CHECK(pos.size() == table.size() && mean.size() == table.size(), "pooled lookup: a key, table and pooling a feature");
  const int64_t bags_n = offsets.numel() - 1;
  const int64_t* o = offsets.data_ptr<int64_t>();
  TORCH_CHECK(bags_n >= 0 && o[0] == 0 && o[bags_n] == values.numel(), "pooled lookup: offsets do not span the ids");
  for (int64_t i = 0; i < bags_n; ++i) TORCH_CHECK(o[i + 1] >= o[i], "pooled lookup: offsets must not decrease");
  std::vector<int64_t> off(table.size() + 1, 0);
  for (size_t f = 0; f < table.size(); ++f) {
    TORCH_CHECK(pos[f] >= 0 && (pos[f] + 1) * batch <= bags_n, "pooled lookup: feature ", f, " has no bags");
    TORCH_CHECK(table[f] >= 0 && size_t(table[f]) < weights.size(), "pooled lookup: feature ", f, " has no table");
    off[f + 1] = off[f] + weights[size_t(table[f])].size(1);
  }
  for (const auto& w : weights)
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kFloat && w.is_contiguous() && w.dim() == 2,
                "pooled lookup: the tables must be contiguous float32 CPU matrices");
  return Bags{values.data_ptr<int64_t>(), o, scale.defined() ? scale.data_ptr<float>() : nullptr, batch, pos, table,
              mean, std::move(off)};
}

}  // namespace

// [batch, sum of the features' dims]: row b holds each feature's pooled bag b, in turn (zeros
// for an empty bag).
torch::Tensor bags_forward(const torch::Tensor& values, const torch::Tensor& offsets,
                           const std::optional<torch::Tensor>& scale,
                           int64_t batch, const std::vector<int64_t>& pos, const std::vector<int64_t>& table,
                           const std::vector<bool>& mean, const std::vector<torch::Tensor>& weights) {
  const Bags in = bags(values, offsets, scale, batch, pos, table, mean, weights);
  const int64_t width = in.off.back(), features = int64_t(pos.size());
  auto out = torch::empty({batch, width}, torch::kFloat);
  float* o = out.data_ptr<float>();
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, features, 1, [&](int64_t f0, int64_t f1) {
    for (int64_t f = f0; f < f1; ++f) {
      const auto& w = weights[size_t(in.table[size_t(f)])];
      const float* rows = w.data_ptr<float>();
      const int64_t dim = w.size(1), n = w.size(0);
      for (int64_t b = 0; b < batch; ++b) {
        int64_t first, last;
        float factor;
        in.bag(size_t(f), b, &first, &last, &factor);
        float* y = o + b * width + in.off[size_t(f)];
        if (last - first == 1 && !in.scale) {  // one id, the common case: its row
          const int64_t id = in.values[first];
          if (id < 0 || id >= n) {
            bad.store(f);
            return;
          }
          std::memcpy(y, rows + id * dim, size_t(dim) * sizeof(float));
          continue;
        }
        std::memset(y, 0, size_t(dim) * sizeof(float));
        for (int64_t i = first; i < last; ++i) {
          const int64_t id = in.values[i];
          if (id < 0 || id >= n) {
            bad.store(f);
            return;
          }
          const float* r = rows + id * dim;
          if (in.scale) {
            for (int64_t d = 0; d < dim; ++d) y[d] += in.scale[i] * r[d];
          } else {
            for (int64_t d = 0; d < dim; ++d) y[d] += r[d];
          }
        }
        if (factor != 1.0f)  // mean: the sum, then scaled
          for (int64_t d = 0; d < dim; ++d) y[d] *= factor;
      }
    }
  });
  TORCH_CHECK(bad.load() < 0, "pooled lookup: feature ", bad.load(), " has an id outside its table");
  return out;
}

// The gradient of each table where need[t] (zeros but the rows its features' ids read) from
// the output's gradient grad [batch, sum of the features' dims].
std::vector<torch::Tensor> bags_backward(const torch::Tensor& grad, const torch::Tensor& values,
                                         const torch::Tensor& offsets, const std::optional<torch::Tensor>& scale,
                                         int64_t batch,
                                         const std::vector<int64_t>& pos, const std::vector<int64_t>& table,
                                         const std::vector<bool>& mean, const std::vector<torch::Tensor>& weights,
                                         const std::vector<bool>& need) {
  const Bags in = bags(values, offsets, scale, batch, pos, table, mean, weights);
  const int64_t width = in.off.back(), tables = int64_t(weights.size());
  TORCH_CHECK(grad.scalar_type() == torch::kFloat && grad.is_contiguous() && grad.dim() == 2 &&
                  grad.size(0) == batch && grad.size(1) == width,
              "pooled lookup: the output's gradient must be a contiguous float32 [batch, width]");
  TORCH_CHECK(need.size() == weights.size(), "pooled lookup: a need a table");
  std::vector<torch::Tensor> out(static_cast<size_t>(tables));
  for (int64_t t = 0; t < tables; ++t)
    if (need[size_t(t)]) out[size_t(t)] = torch::empty_like(weights[size_t(t)]);
  const float* g = grad.data_ptr<float>();
  at::parallel_for(0, tables, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (!need[size_t(t)]) continue;
      float* rows = out[size_t(t)].data_ptr<float>();
      const int64_t dim = out[size_t(t)].size(1);
      std::memset(rows, 0, size_t(out[size_t(t)].numel()) * sizeof(float));
      for (size_t f = 0; f < in.table.size(); ++f) {  // the table's features in turn: one writer a table
        if (in.table[f] != t) continue;
        for (int64_t b = 0; b < batch; ++b) {
          int64_t first, last;
          float factor;
          in.bag(f, b, &first, &last, &factor);
          const float* src = g + b * width + in.off[f];
          for (int64_t i = first; i < last; ++i) {
            const float s = factor * (in.scale ? in.scale[i] : 1.0f);
            float* r = rows + in.values[i] * dim;
            for (int64_t d = 0; d < dim; ++d) r[d] += s * src[d];
          }
        }
      }
    }
  });
  return out;
}

// Whether every table is a contiguous float32 CPU matrix (what the lookups take).
bool plain_tables(const std::vector<torch::Tensor>& weights) {
  for (const auto& w : weights)
    if (!w.device().is_cpu() || w.scalar_type() != torch::kFloat || !w.is_contiguous() || w.dim() != 2) return false;
  return true;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("plain_tables", &plain_tables);
  m.def("bags_forward", &bags_forward);
  m.def("bags_backward", &bags_backward);
}
