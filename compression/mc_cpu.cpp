// Managed collisions on the CPU, every table of a collection in one call each where TorchRec
// runs about fifteen small torch operations a table:
// - MCH: TorchRec's profile and remap (its LFU policy, with SteadyMCH's shortcut);
//   compression/methods/managed_collision.py says when it is used;
// - MPZCH: TorchRec's multi-probe remap of one bucket without eviction, inserts included;
//   compression/methods/mpzch.py says when it is used.
// Built on first use by compression/native.py; the tests check both against TorchRec's modules.
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

namespace {

constexpr int64_t kEmptySlot = -1;  // FBGEMM's marker of an empty identity slot

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

inline uint64_t fmix(uint64_t h) {
  h = (h ^ (h >> 33)) * 0xff51afd7ed558ccdULL;
  h = (h ^ (h >> 33)) * 0xc4ceb9fe1a85ec53ULL;
  return h ^ (h >> 33);
}

// FBGEMM's hash of an id, murmur_hash3_2x64(id, 0, 0): MurmurHash3 x64 of the block (id, 0)
// with seed 0, its two halves xor'ed. With the second word and the seed 0, h2 starts as h1.
inline uint64_t zch_hash(int64_t id) {
  const uint64_t c1 = 0x87c37b91114253d5ULL, c2 = 0x4cf5ad432745937fULL;
  uint64_t h1 = rotl(rotl(uint64_t(id) * c1, 31) * c2, 27) * 5 + 0x52dce729;
  uint64_t h2 = h1 * 5 + 0x38495ab5;
  h1 ^= 16;
  h2 ^= 16;
  h1 += h2;
  h2 += h1;
  h1 = fmix(h1);
  h2 = fmix(h2);
  h1 += h2;
  h2 += h1;
  return h1 ^ h2;
}

// A table's eviction in training (compression/mpzch.py's step clock): every id read gets the
// time `value` (now + TTL); a slot whose time is below `threshold` (now) and the id's is expired.
struct Eviction {
  int32_t* meta = nullptr;  // each slot's time of last read; null: no eviction
  int64_t value = 0, threshold = 0;
  bool lru = false;  // FBGEMM's policy 1 (LRU), else 0 (TTL)
};

// One table's slots for n ids (-1, the empty marker, read as -2), identities ident[0, size).
// An id probes `probes` slots from its home slot (hash % size), circularly.
// Lookup (FBGEMM's CPU kernel): its own slot, else its home slot.
// Insert (compression/zch_cpu.py: the same slots, identities, times and evicted slots): each
// distinct id's window is scanned up to its own slot or an empty one (an id found there reads
// it: its time raised). The others (without eviction, those that met an empty slot) take slots
// in rounds: each its window's first empty slot as the round began (with eviction: or expired;
// LRU: the first empty one, else the least recently read expired one), a slot wanted by several
// going to the id that comes first in the batch; the rest read their home slot. A taken slot that
// held an id is appended to evicted.
void zch_table(const int64_t* v, int64_t n, int64_t* out, int64_t* ident, int64_t size, int64_t probes,
               bool insert, const Eviction& ev, std::vector<int64_t>& evicted) {
  auto next = [size](int64_t s) { return s + 1 == size ? 0 : s + 1; };
  auto id_of = [](int64_t x) { return x == kEmptySlot ? kEmptySlot - 1 : x; };
  if (!insert) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = id_of(v[i]), home = int64_t(zch_hash(id) % uint64_t(size));
      int64_t s = home, found = home;
      for (int64_t k = 0; k < probes; ++k, s = next(s))
        if (ident[s] == id) {
          found = s;
          break;
        }
      out[i] = found;
    }
    return;
  }
  // distinct ids, numbered by first occurrence
  std::vector<std::pair<int64_t, int64_t>> by_id(n);
  for (int64_t i = 0; i < n; ++i) by_id[i] = {id_of(v[i]), i};
  std::sort(by_id.begin(), by_id.end());
  std::vector<int64_t> which(n), firsts;
  for (int64_t j = 0; j < n; ++j) {
    if (j == 0 || by_id[j].first != by_id[j - 1].first) firsts.push_back(by_id[j].second);
    which[by_id[j].second] = firsts.back();  // the id's first position
  }
  std::vector<int64_t> rank(n, -1);  // first position -> number of the distinct id
  std::sort(firsts.begin(), firsts.end());
  const int64_t m = int64_t(firsts.size());
  std::vector<int64_t> ids(m), home(m), slot(m, -1), live;
  for (int64_t u = 0; u < m; ++u) {
    rank[firsts[u]] = u;
    ids[u] = id_of(v[firsts[u]]);
    home[u] = int64_t(zch_hash(ids[u]) % uint64_t(size));
  }
  int32_t* meta = ev.meta;
  const int32_t value = int32_t(ev.value);
  auto read = [&](int64_t s) {
    if (meta) meta[s] = std::max(meta[s], value);
  };
  for (int64_t u = 0; u < m; ++u) {  // ids already in: an id never sits past an empty slot
    int64_t s = home[u];
    bool open = false;
    for (int64_t k = 0; k < probes; ++k, s = next(s)) {
      if (ident[s] == ids[u]) {
        slot[u] = s;
        break;
      }
      if (ident[s] == kEmptySlot) {
        open = true;
        break;
      }
    }
    if (slot[u] >= 0)
      read(slot[u]);
    else if (open || meta)  // with eviction a window of others may hold an expired slot
      live.push_back(u);
  }
  auto expired = [&](int64_t s) { return meta[s] < ev.threshold && meta[s] < value; };
  std::vector<int64_t> pick(m), seen(m);
  while (!live.empty()) {
    for (int64_t u : live) {  // each id's slot as the round begins, or none
      int64_t s = home[u], oldest = -1;
      pick[u] = -1;
      for (int64_t k = 0; k < probes; ++k, s = next(s)) {
        if (ident[s] == kEmptySlot || (meta && !ev.lru && expired(s))) {  // the first usable slot
          pick[u] = s;
          break;
        }
        if (meta && ev.lru && expired(s) && (oldest < 0 || meta[s] < meta[oldest])) oldest = s;
      }
      if (pick[u] < 0) pick[u] = oldest;  // LRU: no empty slot, the least recently read expired one
      if (pick[u] >= 0) seen[u] = ident[pick[u]];
    }
    size_t kept = 0;
    for (int64_t u : live) {  // in the batch's order: the first to want a slot takes it
      if (pick[u] < 0) continue;
      if (ident[pick[u]] == seen[u]) {
        if (seen[u] != kEmptySlot) evicted.push_back(pick[u]);
        ident[pick[u]] = ids[u];
        slot[u] = pick[u];
        read(pick[u]);
      } else {
        live[kept++] = u;
      }
    }
    live.resize(kept);
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t u = rank[which[i]];
    out[i] = slot[u] >= 0 ? slot[u] : home[u];
  }
}

}  // namespace

// Every table's ids to their slots (TorchRec's HashZchManagedCollisionModule.remap of one
// bucket, fallback on): table t's ids are values[bounds[t] : bounds[t + 1]], its identities
// the [size, 1] buffer identities[t], its window probes[t] slots. With insert (training), new ids
// are written into the identities, each table's step count steps[t] is raised by one and, where
// ttl[t] >= 0, slots expire: metadata[t] ([size, 1] int32) holds each slot's step of last read
// plus the TTL, now the raised step count; policy[t] 1 is LRU, 0 TTL. Returns the slots and each
// table's evicted slots (sorted, distinct). Undefined, and nothing touched, unless every tensor
// is a contiguous CPU tensor of the type and size this needs.
std::tuple<torch::Tensor, std::vector<torch::Tensor>> zch_remap(
    const torch::Tensor& values, const std::vector<int64_t>& bounds, const std::vector<torch::Tensor>& identities,
    const std::vector<int64_t>& probes, const std::vector<torch::Tensor>& steps, bool insert,
    const std::vector<int64_t>& ttl, const std::vector<int64_t>& policy, const std::vector<torch::Tensor>& metadata) {
  const size_t n = identities.size();
  if (!plain_bounds(values, bounds, n) || probes.size() != n || steps.size() != n || ttl.size() != n ||
      policy.size() != n || metadata.size() != n)
    return {};
  for (size_t t = 0; t < n; ++t) {
    const auto& ident = identities[t];
    if (!ident.device().is_cpu() || ident.scalar_type() != torch::kLong || !ident.is_contiguous() ||
        ident.dim() != 2 || ident.size(1) != 1 || ident.size(0) < 1 || probes[t] < 1)
      return {};
    if (!steps[t].device().is_cpu() || steps[t].scalar_type() != torch::kLong || steps[t].numel() != 1)
      return {};
    const auto& meta = metadata[t];
    if (insert && ttl[t] >= 0 &&
        (!meta.defined() || !meta.device().is_cpu() || meta.scalar_type() != torch::kInt || !meta.is_contiguous() ||
         meta.numel() != ident.size(0) || (policy[t] != 0 && policy[t] != 1)))
      return {};
  }
  auto out = torch::empty_like(values);
  std::vector<std::vector<int64_t>> evicted(n);
  const int64_t* v = values.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, int64_t(n), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      Eviction ev;
      if (insert) {
        const int64_t now = ++steps[t].data_ptr<int64_t>()[0];
        if (ttl[t] >= 0) ev = {metadata[t].data_ptr<int32_t>(), now + ttl[t], now, policy[t] == 1};
      }
      zch_table(v + bounds[t], bounds[t + 1] - bounds[t], o + bounds[t], identities[t].data_ptr<int64_t>(),
                identities[t].size(0), probes[t], insert, ev, evicted[t]);
      std::sort(evicted[t].begin(), evicted[t].end());
      evicted[t].erase(std::unique(evicted[t].begin(), evicted[t].end()), evicted[t].end());
    }
  });
  std::vector<torch::Tensor> slots(n);
  for (size_t t = 0; t < n; ++t) slots[t] = torch::tensor(evicted[t], torch::kLong);
  return {out, slots};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mch_profile", &mch_profile);
  m.def("mch_remap", &mch_remap);
  m.def("zch_remap", &zch_remap);
}
