// Criteo TSV to the processed columns on the CPU's threads, for files whose every line is
// clean: recsys/data/criteo.py (_cpu_pipeline) says what "clean" is and takes polars' path
// for any other file, so that path alone finds and names a bad line. A plain C library (no
// torch: the data pipeline loads none), built on first use by compression/native.py.
//
// A file is read a piece (a byte range of whole lines) at a time: its lines parsed into
// typed columns (criteo_parse), the train rows' ids counted per field in hash tables
// (criteo_count), and once the vocabularies are known, each id replaced by its vocabulary id
// in place (criteo_map), so a file of any size takes memory for one piece and the tables.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kDense = 13;
constexpr int kSparse = 26;
constexpr int kMaxDigits = 18;  // below 2^63 whatever the digits: a longer integer goes to polars
constexpr int kMaxHex = 15;     // likewise for a hexadecimal id (the real data has 8 digits)

constexpr int kFields = kDense + kSparse;
constexpr int64_t kBlock = 512;        // rows parsed into a row-major block, then written out by column
constexpr int64_t kChunk = 4 << 20;    // a piece's lines are counted and parsed in chunks of about this
constexpr int64_t kNoKey = -1;         // an empty id (no value) and a free slot of a table

// a byte's hexadecimal digit, or -1
struct HexTable {
  int8_t v[256];
  HexTable() {
    for (int c = 0; c < 256; ++c)
      v[c] = c >= '0' && c <= '9' ? int8_t(c - '0')
             : c >= 'a' && c <= 'f' ? int8_t(c - 'a' + 10)
             : c >= 'A' && c <= 'F' ? int8_t(c - 'A' + 10)
                                    : int8_t(-1);
  }
};
const HexTable kHex;

// One line [p, e) into *label and row (13 integers, then 26 ids); false where it is not clean.
bool parse_line(const char* p, const char* e, uint8_t* label, int64_t* row) {
  if (e - p < 2 || (p[0] != '0' && p[0] != '1') || p[1] != '\t') return false;
  *label = uint8_t(p[0] == '1');
  p += 2;
  for (int j = 0; j < kDense; ++j) {
    const bool neg = p < e && *p == '-';
    const char* q = p + (neg ? 1 : 0);
    int64_t v = 0;
    int d = 0;
    while (q < e && *q >= '0' && *q <= '9') {
      if (++d > kMaxDigits) return false;
      v = v * 10 + (*q - '0');
      ++q;
    }
    if (q == e || *q != '\t' || (neg && d == 0)) return false;
    row[j] = neg ? -v : v;  // empty: 0, as the output's fill_null(0) makes it
    p = q + 1;
  }
  for (int j = 0; j < kSparse; ++j) {
    const char* q = p;
    int64_t v = 0;
    int d = 0;
    for (int h; q < e && (h = kHex.v[uint8_t(*q)]) >= 0; ++q) {
      if (++d > kMaxHex) return false;
      v = v * 16 + h;
    }
    if (j + 1 < kSparse ? (q == e || *q != '\t') : q != e) return false;
    row[kDense + j] = d ? v : kNoKey;
    p = q + 1;
  }
  return true;
}

// The mapped text of a file.
struct File {
  const char* text = nullptr;
  int64_t size = 0;

  explicit File(const char* path) {
    const int fd = open(path, O_RDONLY);
    if (fd < 0) return;
    struct stat st;
    if (fstat(fd, &st) == 0 && st.st_size > 0) {
      void* m = mmap(nullptr, size_t(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
      if (m != MAP_FAILED) {
        text = static_cast<const char*>(m);
        size = st.st_size;
        madvise(m, size_t(size), MADV_SEQUENTIAL);
      }
    }
    close(fd);
  }
  ~File() {
    if (text) munmap(const_cast<char*>(text), size_t(size));
  }

  // The pages of [from, to) given back: read, they stay in the page cache, not in this
  // process's memory (a file of many pieces would otherwise hold it all).
  void release(int64_t from, int64_t to) const {
    const int64_t page = sysconf(_SC_PAGESIZE);
    const int64_t a = from / page * page;
    if (to > a) madvise(const_cast<char*>(text) + a, size_t(to - a), MADV_DONTNEED);
  }

  // the start of the first line that starts at or after at (size where none does)
  int64_t line_start(int64_t at) const {
    if (at <= 0) return 0;
    if (at >= size) return size;
    const void* nl = memchr(text + at - 1, '\n', size_t(size - at + 1));
    return nl ? static_cast<const char*>(nl) - text + 1 : size;
  }
};

// The lines of [from, to) (from and to at line starts, or the file's end): chunks of whole
// lines and the first line of each, counted from from.
struct Lines {
  std::vector<int64_t> start, first;

  Lines(const File& f, int64_t from, int64_t to, int threads) {
    const int64_t chunks = std::max<int64_t>(1, (to - from) / kChunk);
    start.assign(chunks + 1, to);
    start[0] = from;
    for (int64_t c = 1; c < chunks; ++c) start[c] = std::max(f.line_start(from + (to - from) * c / chunks), start[c - 1]);
    std::vector<int64_t> lines(chunks, 0);
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int64_t c = 0; c < chunks; ++c) lines[c] = std::count(f.text + start[c], f.text + start[c + 1], '\n');
    if (to > from && f.text[to - 1] != '\n') {  // the file's last line, without its '\n'
      int64_t c = chunks - 1;
      while (start[c] == to) --c;
      lines[c] += 1;
    }
    first.assign(chunks + 1, 0);
    for (int64_t c = 0; c < chunks; ++c) first[c + 1] = first[c] + lines[c];
  }
  int64_t count() const { return first.back(); }
};

// value -> number (a count, then a vocabulary id): open addressing, linear probes, kNoKey free.
struct Table {
  std::vector<int64_t> keys, vals;
  int64_t used = 0;
  int shift = 64;

  Table() { resize(1 << 10); }
  void resize(int64_t slots) {
    std::vector<int64_t> k(std::move(keys)), v(std::move(vals));
    keys.assign(slots, kNoKey);
    vals.assign(slots, 0);
    shift = 64 - __builtin_ctzll(uint64_t(slots));
    used = 0;
    for (size_t i = 0; i < k.size(); ++i)
      if (k[i] != kNoKey) *slot(k[i]) += v[i];
  }
  size_t home(int64_t key) const { return size_t((uint64_t(key) * 0x9E3779B97F4A7C15ull) >> shift); }
  // the key's value, a new one 0
  int64_t* slot(int64_t key) {
    if (2 * (used + 1) > int64_t(keys.size())) resize(2 * int64_t(keys.size()));
    const size_t mask = keys.size() - 1;
    for (size_t i = home(key);; i = (i + 1) & mask) {
      if (keys[i] == key) return &vals[i];
      if (keys[i] == kNoKey) {
        keys[i] = key;
        ++used;
        return &vals[i];
      }
    }
  }
  // the key's value, 0 where it has none
  int64_t find(int64_t key) const {
    const size_t mask = keys.size() - 1;
    for (size_t i = home(key);; i = (i + 1) & mask) {
      if (keys[i] == key) return vals[i];
      if (keys[i] == kNoKey) return 0;
    }
  }
};

struct Tables {
  std::vector<Table> t;
};

}  // namespace

extern "C" {

// The file mapped (null where it cannot be read or is empty), its size in bytes; closed by
// criteo_close.
void* criteo_open(const char* path) {
  File* f = new File(path);
  if (!f->text) {
    delete f;
    return nullptr;
  }
  return f;
}
void criteo_close(void* f) { delete static_cast<File*>(f); }
int64_t criteo_size(void* f) { return static_cast<File*>(f)->size; }

// The start of the first line at or after byte at.
int64_t criteo_line_start(void* f, int64_t at) { return static_cast<File*>(f)->line_start(at); }

// The number of lines of [from, to) (both line starts or the file's end).
int64_t criteo_lines(void* file, int64_t from, int64_t to, int threads) {
  const File& f = *static_cast<File*>(file);
  const int64_t n = Lines(f, from, to, threads).count();
  f.release(from, to);
  return n;
}

// The first n lines of [from, to) into label (n), dense (13, n) and sparse (26, n): 1 where
// every one is clean, 0 where one is not or the range holds fewer: 40 tab-separated fields
// ended by '\n' (or the file's end), label 0 or 1, each integer an optional '-' and at most
// 18 digits (empty: 0), each id at most 15 hexadecimal digits (empty: -1).
int criteo_parse(void* file, int64_t from, int64_t to, int64_t n, uint8_t* label, int64_t* dense, int64_t* sparse,
                 int threads) {
  const File& f = *static_cast<File*>(file);
  const Lines lines(f, from, to, threads);
  if (lines.count() < n) return 0;
  const int64_t chunks = int64_t(lines.start.size()) - 1;
  std::atomic<bool> clean{true};
#pragma omp parallel for num_threads(threads) schedule(dynamic)
  for (int64_t c = 0; c < chunks; ++c) {
    std::vector<int64_t> block(kBlock * kFields);
    uint8_t labels[kBlock];
    const char* p = f.text + lines.start[c];
    const char* stop = f.text + lines.start[c + 1];
    const int64_t last = std::min(n, lines.first[c + 1]);
    for (int64_t r = lines.first[c]; r < last && clean.load(std::memory_order_relaxed);) {
      const int64_t rows = std::min(kBlock, last - r);
      for (int64_t i = 0; i < rows; ++i) {
        const void* nl = memchr(p, '\n', size_t(stop - p));
        const char* e = nl ? static_cast<const char*>(nl) : stop;
        if (!parse_line(p, e, labels + i, block.data() + i * kFields)) {
          clean.store(false, std::memory_order_relaxed);
          break;
        }
        p = e + 1;
      }
      if (!clean.load(std::memory_order_relaxed)) break;
      // by column: each output column written in one run, not one value a row across 39 of them
      std::memcpy(label + r, labels, size_t(rows));
      for (int j = 0; j < kFields; ++j) {
        int64_t* out = (j < kDense ? dense + j * n : sparse + (j - kDense) * n) + r;
        for (int64_t i = 0; i < rows; ++i) out[i] = block[i * kFields + j];
      }
      r += rows;
    }
  }
  f.release(from, to);
  return clean.load() ? 1 : 0;
}

// One hash table per field, each value -> its count; freed by criteo_tables_free.
void* criteo_tables(int fields) { return new Tables{std::vector<Table>(size_t(fields))}; }
void criteo_tables_free(void* t) { delete static_cast<Tables*>(t); }

// Counts each value of sparse (fields, n) but -1 in its field's table, on the rows whose
// code is 0 (every row where code is null); the fields on threads.
void criteo_count(void* tables, const int64_t* sparse, int64_t n, const int8_t* code, int threads) {
  auto& t = static_cast<Tables*>(tables)->t;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
  for (int64_t j = 0; j < int64_t(t.size()); ++j) {
    const int64_t* v = sparse + j * n;
    for (int64_t i = 0; i < n; ++i)
      if (v[i] != kNoKey && (!code || code[i] == 0)) ++*t[size_t(j)].slot(v[i]);
  }
}

// The number of values in field's table, and its values and their numbers into keys and vals.
int64_t criteo_table_size(void* tables, int field) { return static_cast<Tables*>(tables)->t[size_t(field)].used; }
void criteo_table_items(void* tables, int field, int64_t* keys, int64_t* vals) {
  const Table& t = static_cast<Tables*>(tables)->t[size_t(field)];
  int64_t k = 0;
  for (size_t i = 0; i < t.keys.size(); ++i)
    if (t.keys[i] != kNoKey) keys[k] = t.keys[i], vals[k++] = t.vals[i];
}

// field's table made keys[i] -> vals[i] (n distinct values of at least 0), whatever it held.
void criteo_table_set(void* tables, int field, const int64_t* keys, const int64_t* vals, int64_t n) {
  Table& t = static_cast<Tables*>(tables)->t[size_t(field)];
  int64_t slots = 1 << 10;
  while (slots < 2 * (n + 1)) slots *= 2;
  t.keys.clear();
  t.vals.clear();
  t.resize(slots);
  for (int64_t i = 0; i < n; ++i) *t.slot(keys[i]) = vals[i];
}

// Each value of sparse (fields, n) replaced by its number in its field's table, in place: 0
// for -1 and for a value the table does not hold; the fields on threads.
void criteo_map(void* tables, int64_t* sparse, int64_t n, int threads) {
  const auto& t = static_cast<Tables*>(tables)->t;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
  for (int64_t j = 0; j < int64_t(t.size()); ++j) {
    int64_t* v = sparse + j * n;
    for (int64_t i = 0; i < n; ++i) v[i] = v[i] == kNoKey ? 0 : t[size_t(j)].find(v[i]);
  }
}

}  // extern "C"
