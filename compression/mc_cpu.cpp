// Managed collisions on the CPU: TorchRec's MCH profile and remap (its LFU policy, with
// SteadyMCH's shortcut) for every table of a collection in one call each, where TorchRec runs
// about fifteen small torch operations a table. Built on first use by compression/native.py;
// compression/methods/managed_collision.py says when it is used and checks it against TorchRec.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

namespace {

// Table t's ids are values[bounds[t] : bounds[t + 1]]. Its buffers are TorchRec's: the sorted
// raw ids, the LFU counts (in the sorted ids' order), the slot of each sorted id, the history
// of ids since the last eviction and the step count.
bool plain_long(const torch::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == torch::kLong && t.is_contiguous() && t.dim() == 1;
}

bool plain_bounds(const torch::Tensor& values, const std::vector<int64_t>& bounds, size_t tables) {
  if (!plain_long(values) || bounds.size() != tables + 1 || bounds[0] != 0 || bounds[tables] != values.numel())
    return false;
  for (size_t t = 0; t < tables; ++t)
    if (bounds[t + 1] < bounds[t]) return false;
  return true;
}

// The position of id in the first n - 1 sorted ids (torch.searchsorted of sorted[:-1]).
inline int64_t lower(const int64_t* sorted, int64_t n, int64_t id) {
  return std::lower_bound(sorted, sorted + n - 1, id) - sorted;
}

}  // namespace

// Training's profile of every table: its step count plus one; its first take[t] ids appended
// to its history at at[t]; and where check[t] (an eviction step), SteadyMCH's shortcut: when
// no new id of the history is counted more often than the least counted slot, the held ids'
// counts are raised by their counts in the history and 1 is returned for the table (the
// history is then spent), else 0 and nothing more (TorchRec evicts). Empty, and nothing
// touched, unless every tensor is a contiguous int64 CPU vector of the sizes this needs,
// the slot maps (read by mch_remap after it) among them.
std::vector<int64_t> mch_profile(const torch::Tensor& values, const std::vector<int64_t>& bounds,
                                 const std::vector<int64_t>& take, const std::vector<int64_t>& at,
                                 const std::vector<bool>& check, const std::vector<torch::Tensor>& history,
                                 const std::vector<torch::Tensor>& sorted, const std::vector<torch::Tensor>& counts,
                                 const std::vector<torch::Tensor>& mapping, const std::vector<torch::Tensor>& iters) {
  const size_t n = history.size();
  if (!plain_bounds(values, bounds, n) || take.size() != n || at.size() != n || check.size() != n ||
      sorted.size() != n || counts.size() != n || mapping.size() != n || iters.size() != n)
    return {};
  for (size_t t = 0; t < n; ++t) {
    if (!plain_long(history[t]) || !plain_long(sorted[t]) || !plain_long(counts[t]) || !plain_long(iters[t]) ||
        !plain_long(mapping[t]) || iters[t].numel() != 1 || sorted[t].numel() < 2 ||
        counts[t].numel() != sorted[t].numel() || mapping[t].numel() != sorted[t].numel() ||
        take[t] < 0 || take[t] > bounds[t + 1] - bounds[t] || at[t] < 0 || at[t] + take[t] > history[t].numel())
      return {};
  }
  std::vector<int64_t> done(n, 0);
  const int64_t* v = values.data_ptr<int64_t>();
  at::parallel_for(0, int64_t(n), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      iters[t].data_ptr<int64_t>()[0] += 1;
      int64_t* h = history[t].data_ptr<int64_t>();
      std::copy(v + bounds[t], v + bounds[t] + take[t], h + at[t]);
      if (!check[t]) continue;
      std::vector<int64_t> ids(h, h + at[t] + take[t]);
      std::sort(ids.begin(), ids.end());
      const int64_t* held = sorted[t].data_ptr<int64_t>();
      int64_t* cnt = counts[t].data_ptr<int64_t>();
      const int64_t z = sorted[t].numel();
      const int64_t least = *std::min_element(cnt, cnt + z - 1);
      std::vector<std::array<int64_t, 2>> hits;  // position, count
      bool steady = true;
      for (size_t i = 0; i < ids.size() && steady;) {
        size_t j = i;
        while (j < ids.size() && ids[j] == ids[i]) ++j;
        const int64_t c = int64_t(j - i), pos = lower(held, z, ids[i]);
        if (held[pos] == ids[i])
          hits.push_back({pos, c});
        else if (c > least)
          steady = false;
        i = j;
      }
      if (!steady) continue;
      for (const auto& [pos, c] : hits) cnt[pos] += c;
      done[t] = 1;
    }
  });
  return done;
}

// Every table's ids to their slots (TorchRec's _mch_remap): a held id to its slot, any other
// to fallback[t]. Undefined, and nothing computed, unless the tensors are as mch_profile asks.
torch::Tensor mch_remap(const torch::Tensor& values, const std::vector<int64_t>& bounds,
                        const std::vector<torch::Tensor>& sorted, const std::vector<torch::Tensor>& mapping,
                        const std::vector<int64_t>& fallback) {
  const size_t n = sorted.size();
  if (!plain_bounds(values, bounds, n) || mapping.size() != n || fallback.size() != n) return {};
  for (size_t t = 0; t < n; ++t)
    if (!plain_long(sorted[t]) || !plain_long(mapping[t]) || sorted[t].numel() < 1 ||
        mapping[t].numel() != sorted[t].numel())
      return {};
  auto out = torch::empty_like(values);
  const int64_t* v = values.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, int64_t(n), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t* held = sorted[t].data_ptr<int64_t>();
      const int64_t* slot = mapping[t].data_ptr<int64_t>();
      const int64_t z = sorted[t].numel();
      for (int64_t i = bounds[t]; i < bounds[t + 1]; ++i) {
        const int64_t pos = lower(held, z, v[i]);
        o[i] = held[pos] == v[i] ? slot[pos] : fallback[t];
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mch_profile", &mch_profile);
  m.def("mch_remap", &mch_remap);
}
