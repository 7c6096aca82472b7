// One-hot lookups of a whole collection on the CPU: every feature's rows gathered into the
// pooled output's layout in one call, and backward every table's gradient in one call, where
// torch runs a lookup, a copy into the output and an embedding backward for each feature.
// Built on first use by compression/native.py; compression/bags.py (pooled_lookup) says when
// it is used and checks it against TorchRec's collection.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Feature f's ids are values[pos[f] * batch : (pos[f] + 1) * batch] (one a sample), its rows
// those of weights[table[f]]; its columns of the output start at the sum of the dims before it.
std::vector<int64_t> column_offsets(const std::vector<torch::Tensor>& weights, const std::vector<int64_t>& table) {
  std::vector<int64_t> off(table.size() + 1, 0);
  for (size_t f = 0; f < table.size(); ++f) off[f + 1] = off[f] + weights[size_t(table[f])].size(1);
  return off;
}

void check(const torch::Tensor& values, int64_t batch, const std::vector<int64_t>& pos,
           const std::vector<int64_t>& table, const std::vector<torch::Tensor>& weights) {
  TORCH_CHECK(values.device().is_cpu() && values.scalar_type() == torch::kLong && values.is_contiguous() &&
                  values.dim() == 1,
              "one-hot lookup: the ids must be a contiguous int64 CPU vector");
  TORCH_CHECK(pos.size() == table.size(), "one-hot lookup: a position and a table for each feature");
  for (size_t f = 0; f < pos.size(); ++f) {
    TORCH_CHECK(pos[f] >= 0 && (pos[f] + 1) * batch <= values.numel(), "one-hot lookup: feature ", f,
                "'s ids lie outside the values");
    TORCH_CHECK(table[f] >= 0 && size_t(table[f]) < weights.size(), "one-hot lookup: feature ", f, " has no table");
  }
  for (const auto& w : weights)
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kFloat && w.is_contiguous() && w.dim() == 2,
                "one-hot lookup: the tables must be contiguous float32 CPU matrices");
}

}  // namespace

// [batch, sum of the features' dims]: row b holds each feature's row of its b-th id, in turn.
torch::Tensor onehot_gather(const torch::Tensor& values, int64_t batch, const std::vector<int64_t>& pos,
                            const std::vector<int64_t>& table, const std::vector<torch::Tensor>& weights) {
  check(values, batch, pos, table, weights);
  const auto off = column_offsets(weights, table);
  const int64_t width = off.back(), features = int64_t(pos.size());
  auto out = torch::empty({batch, width}, torch::kFloat);
  float* o = out.data_ptr<float>();
  const int64_t* v = values.data_ptr<int64_t>();
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, features, 1, [&](int64_t f0, int64_t f1) {
    for (int64_t f = f0; f < f1; ++f) {
      const auto& w = weights[size_t(table[size_t(f)])];
      const float* rows = w.data_ptr<float>();
      const int64_t dim = w.size(1), n = w.size(0);
      const int64_t* ids = v + pos[size_t(f)] * batch;
      for (int64_t b = 0; b < batch; ++b) {
        const int64_t id = ids[b];
        if (id < 0 || id >= n) {
          bad.store(f);
          return;
        }
        std::memcpy(o + b * width + off[size_t(f)], rows + id * dim, size_t(dim) * sizeof(float));
      }
    }
  });
  TORCH_CHECK(bad.load() < 0, "one-hot lookup: feature ", bad.load(), " has an id outside its table");
  return out;
}

// The gradient of each table (zeros but the rows its features' ids read) from the output's
// gradient grad [batch, sum of the features' dims]; only the tables where need[t].
std::vector<torch::Tensor> onehot_scatter(const torch::Tensor& grad, const torch::Tensor& values, int64_t batch,
                                          const std::vector<int64_t>& pos, const std::vector<int64_t>& table,
                                          const std::vector<torch::Tensor>& weights, const std::vector<bool>& need) {
  check(values, batch, pos, table, weights);
  const auto off = column_offsets(weights, table);
  const int64_t width = off.back();
  TORCH_CHECK(grad.scalar_type() == torch::kFloat && grad.is_contiguous() && grad.dim() == 2 &&
                  grad.size(0) == batch && grad.size(1) == width,
              "one-hot lookup: the output's gradient must be a contiguous float32 [batch, width]");
  const int64_t tables = int64_t(weights.size());
  std::vector<torch::Tensor> out(static_cast<size_t>(tables));
  for (int64_t t = 0; t < tables; ++t)
    if (need[size_t(t)]) out[size_t(t)] = torch::empty_like(weights[size_t(t)]);
  const float* g = grad.data_ptr<float>();
  const int64_t* v = values.data_ptr<int64_t>();
  at::parallel_for(0, tables, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (!need[size_t(t)]) continue;
      float* rows = out[size_t(t)].data_ptr<float>();
      const int64_t dim = out[size_t(t)].size(1);
      std::memset(rows, 0, size_t(out[size_t(t)].numel()) * sizeof(float));
      for (size_t f = 0; f < table.size(); ++f) {  // each of the table's features in turn: one writer a table
        if (table[f] != t) continue;
        const int64_t* ids = v + pos[f] * batch;
        for (int64_t b = 0; b < batch; ++b) {
          float* r = rows + ids[b] * dim;
          const float* src = g + b * width + off[f];
          for (int64_t d = 0; d < dim; ++d) r[d] += src[d];
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("onehot_gather", &onehot_gather);
  m.def("onehot_scatter", &onehot_scatter);
}
