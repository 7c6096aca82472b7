// Criteo TSV lines to typed columns on the CPU's threads, for files whose every line is
// clean: recsys/data/criteo.py (_clean_typed) says what "clean" is and takes polars' path for
// any other file, so that path alone finds and names a bad line. A plain C library (no
// torch: the data pipeline loads none), built on first use by compression/native.py.
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
constexpr int64_t kBlock = 512;  // rows parsed into a row-major block, then written out by column

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
    row[kDense + j] = d ? v : -1;  // empty: -1, no id's value
    p = q + 1;
  }
  return true;
}

}  // namespace

// The file's text, mapped; chunks of whole lines (a line belongs to the chunk it starts in)
// and their first rows.
struct Mapped {
  const char* text = nullptr;
  int64_t size = 0;
  std::vector<int64_t> start, first;

  explicit Mapped(const char* path) {
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
  ~Mapped() {
    if (text) munmap(const_cast<char*>(text), size_t(size));
  }

  // false where the file could not be read
  bool count_lines(int threads) {
    if (!text) return false;
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(size >> 20, 8 * int64_t(threads)));
    start.assign(chunks + 1, size);
    start[0] = 0;
    for (int64_t c = 1; c < chunks; ++c) {
      const int64_t from = std::max(size * c / chunks, start[c - 1]);
      const void* nl = from < size ? memchr(text + from, '\n', size_t(size - from)) : nullptr;
      start[c] = nl ? static_cast<const char*>(nl) - text + 1 : size;
    }
    std::vector<int64_t> lines(chunks, 0);
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int64_t c = 0; c < chunks; ++c) lines[c] = std::count(text + start[c], text + start[c + 1], '\n');
    if (text[size - 1] != '\n') {  // the last line, without its '\n', in the last chunk that holds any
      int64_t c = chunks - 1;
      while (start[c] == size) --c;
      lines[c] += 1;
    }
    first.assign(chunks + 1, 0);
    for (int64_t c = 0; c < chunks; ++c) first[c + 1] = first[c] + lines[c];
    return true;
  }
};

extern "C" {

// The number of lines of path (at most max_rows where max_rows > 0), or -1 where the file
// cannot be read.
int64_t criteo_lines(const char* path, int64_t max_rows, int threads) {
  Mapped m(path);
  if (!m.count_lines(threads)) return -1;
  const int64_t n = m.first.back();
  return max_rows > 0 ? std::min(n, max_rows) : n;
}

// The first n lines of path into label (n), dense (13, n) and sparse (26, n): 1 where every
// one is clean, 0 where one is not or the file changed: 40 tab-separated fields ended by
// '\n' (or the file's end), label 0 or 1, each integer an optional '-' and at most 18
// digits (empty: 0), each id at most 15 hexadecimal digits (empty: -1).
int criteo_parse(const char* path, int64_t n, uint8_t* label, int64_t* dense, int64_t* sparse, int threads) {
  Mapped m(path);
  if (!m.count_lines(threads) || m.first.back() < n) return 0;
  const int64_t chunks = int64_t(m.start.size()) - 1;
  std::atomic<bool> clean{true};
#pragma omp parallel for num_threads(threads) schedule(dynamic)
  for (int64_t c = 0; c < chunks; ++c) {
    std::vector<int64_t> block(kBlock * kFields);
    uint8_t labels[kBlock];
    const char* p = m.text + m.start[c];
    const char* stop = m.text + m.start[c + 1];
    const int64_t last = std::min(n, m.first[c + 1]);
    for (int64_t r = m.first[c]; r < last && clean.load(std::memory_order_relaxed);) {
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
  return clean.load() ? 1 : 0;
}

}  // extern "C"
