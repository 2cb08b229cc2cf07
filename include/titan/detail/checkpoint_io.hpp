#pragma once
// titan/detail/checkpoint_io.hpp: the low-level pieces of checkpoint.hpp and safetensors.hpp —
// CRC-32, POSIX file helpers with errors that name the path, and the parallel writer that keeps
// the disk busy (on detail/tasks.hpp's threads). Depends on the standard library, POSIX and c10 only.

#include <titan/detail/tasks.hpp>

#include <c10/util/Exception.h>

#include <fcntl.h>
#include <ftw.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TITAN_CRC32_PCLMUL 1  // carry-less multiply folding, chosen at run time where the CPU has it
#endif
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace titan {
namespace detail {

/// Lookup tables of CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320: the CRC of zlib, gzip
/// and Python's zlib.crc32), slicing-by-8.
inline const std::array<std::array<uint32_t, 256>, 8>& crc32_tables() {
  static const auto tables = [] {
    std::array<std::array<uint32_t, 256>, 8> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1U) ? (c >> 1) ^ 0xEDB88320U : c >> 1;
      t[0][i] = c;
    }
    for (size_t k = 1; k < 8; ++k)
      for (uint32_t i = 0; i < 256; ++i) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xFFU];
    return t;
  }();
  return tables;
}

/// The CRC-32 register (reflected, no inversions) continued over `size` bytes, eight at a time.
inline uint32_t crc32_table_update(uint32_t crc, const uint8_t* p, size_t size) {
  const auto& t = crc32_tables();
  while (size >= 8) {
    uint32_t one = 0, two = 0;
    std::memcpy(&one, p, 4);  // little-endian hosts only (x86-64, aarch64)
    std::memcpy(&two, p + 4, 4);
    one ^= crc;
    crc = t[7][one & 0xFFU] ^ t[6][(one >> 8) & 0xFFU] ^ t[5][(one >> 16) & 0xFFU] ^ t[4][one >> 24] ^
          t[3][two & 0xFFU] ^ t[2][(two >> 8) & 0xFFU] ^ t[1][(two >> 16) & 0xFFU] ^ t[0][two >> 24];
    p += 8;
    size -= 8;
  }
  while (size-- > 0) crc = t[0][(crc ^ *p++) & 0xFFU] ^ (crc >> 8);
  return crc;
}

#ifdef TITAN_CRC32_PCLMUL
/// Whether this CPU has carry-less multiplication (PCLMULQDQ: x86-64 since 2010).
inline bool cpu_has_pclmul() {
  static const bool has = __builtin_cpu_supports("pclmul");
  return has;
}

/// One fold of CRC-32 by carry-less multiplication (Intel, "Fast CRC Computation for Generic
/// Polynomials Using PCLMULQDQ", 2009): 16 bytes loaded little-endian are a polynomial A of degree
/// < 128 in the reflected order (bit j holds the coefficient of x^(127-j)), so the register's low
/// 64 bits q0 hold x^127..x^64 and its high 64 bits q1 hold x^63..x^0. Moved F bits later, A keeps
/// its remainder as A x^F = q0 x^(F+64) + q1 x^F; with k(n) = reflect32(x^n mod P) << 1 the paper's
/// block for that is clmul(q0, k(F+32)) ^ clmul(q1, k(F-32)) (the offsets absorb the reflected
/// product's one-bit shift). Returns that block plus `next`, the block found F bits later.
__attribute__((target("pclmul,sse2"))) inline __m128i crc32_fold_block(__m128i a, __m128i k, __m128i next) {
  return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(a, k, 0x00), _mm_clmulepi64_si128(a, k, 0x11)), next);
}

/// The CRC-32 register (as crc32_table_update) continued over `size` bytes, a multiple of 16 and
/// at least 64: four blocks fold 512 bits at a time, then into one, which folds 128 bits at a time
/// (crc32_fold_block); the last block's 16 bytes have the CRC the bytes before had, which the
/// tables finish.
__attribute__((target("pclmul,sse2"))) inline uint32_t crc32_fold_update(uint32_t crc, const uint8_t* p, size_t size) {
  const __m128i k512 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);  // {k(512 - 32), k(512 + 32)}
  const __m128i k128 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);  // {k(128 - 32), k(128 + 32)}
  const auto load = [](const uint8_t* q) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)); };
  const auto fold = crc32_fold_block;
  __m128i x0 = _mm_xor_si128(load(p), _mm_cvtsi32_si128(static_cast<int>(crc)));  // the register enters the first 4 bytes
  __m128i x1 = load(p + 16), x2 = load(p + 32), x3 = load(p + 48);
  p += 64;
  size -= 64;
  for (; size >= 64; p += 64, size -= 64) {
    x0 = fold(x0, k512, load(p));
    x1 = fold(x1, k512, load(p + 16));
    x2 = fold(x2, k512, load(p + 32));
    x3 = fold(x3, k512, load(p + 48));
  }
  __m128i x = fold(fold(fold(x0, k128, x1), k128, x2), k128, x3);
  for (; size >= 16; p += 16, size -= 16) x = fold(x, k128, load(p));
  alignas(16) uint8_t last[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(last), x);
  return crc32_table_update(0, last, 16);
}
#endif

/// CRC-32 of `size` bytes, continuing from `crc` (0 to start): equals zlib.crc32(data, crc).
/// Carry-less multiplication where the CPU has it (about 4x the tables), else slicing-by-8.
inline uint32_t crc32(const void* data, size_t size, uint32_t crc = 0) {
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
#ifdef TITAN_CRC32_PCLMUL
  if (size >= 64 && cpu_has_pclmul()) {
    const size_t folded = size & ~size_t{15};
    crc = crc32_fold_update(crc, p, folded);
    p += folded;
    size -= folded;
  }
#endif
  return ~crc32_table_update(crc, p, size);
}

/// An open POSIX file descriptor, closed on destruction; every failure names the path.
class PosixFile {
 public:
  PosixFile(const std::string& path, int flags, mode_t mode = 0644) : path_(path) {
    fd_ = ::open(path.c_str(), flags | O_CLOEXEC, mode);
    TORCH_CHECK(fd_ >= 0, "titan checkpoint: cannot open '", path, "': ", std::strerror(errno));
  }
  PosixFile(const PosixFile&) = delete;
  PosixFile& operator=(const PosixFile&) = delete;
  ~PosixFile() {
    if (fd_ >= 0) ::close(fd_);
  }

  /// Writes all `size` bytes at `offset` (pwrite: safe from several threads at disjoint ranges).
  void write_at(const void* data, size_t size, int64_t offset) {
    const auto* p = static_cast<const char*>(data);
    while (size > 0) {
      ssize_t n = ::pwrite(fd_, p, size, static_cast<off_t>(offset));
      if (n < 0 && errno == EINTR) continue;
      TORCH_CHECK(n > 0, "titan checkpoint: writing '", path_, "' failed: ", std::strerror(errno));
      p += n;
      size -= static_cast<size_t>(n);
      offset += n;
    }
  }
  /// Asks the kernel to start writing [offset, offset + size) to the device now rather than when
  /// the dirty pages age or fsync comes, so that filling the page cache and the device's writes
  /// overlap. Only a hint: errors surface at sync().
  void start_writeback(int64_t offset, int64_t size) {
#ifdef SYNC_FILE_RANGE_WRITE
    (void)::sync_file_range(fd_, static_cast<off_t>(offset), static_cast<off_t>(size), SYNC_FILE_RANGE_WRITE);
#else
    (void)offset, (void)size;
#endif
  }
  /// Reads exactly `size` bytes at `offset`; false if the file ends first.
  bool read_at(void* data, size_t size, int64_t offset) const {
    auto* p = static_cast<char*>(data);
    while (size > 0) {
      ssize_t n = ::pread(fd_, p, size, static_cast<off_t>(offset));
      if (n < 0 && errno == EINTR) continue;
      TORCH_CHECK(n >= 0, "titan checkpoint: reading '", path_, "' failed: ", std::strerror(errno));
      if (n == 0) return false;
      p += n;
      size -= static_cast<size_t>(n);
      offset += n;
    }
    return true;
  }
  /// Flushes the file's data and metadata to the storage device.
  void sync() {
    TORCH_CHECK(::fsync(fd_) == 0, "titan checkpoint: fsync of '", path_, "' failed: ", std::strerror(errno));
  }
  int64_t size() const {
    struct stat st {};
    TORCH_CHECK(::fstat(fd_, &st) == 0, "titan checkpoint: stat of '", path_, "' failed: ", std::strerror(errno));
    return static_cast<int64_t>(st.st_size);
  }

 private:
  std::string path_;
  int fd_ = -1;
};

/// Lowers the calling thread's CPU priority to nice 10 (threads it then creates inherit it), so
/// that a background save's writers yield the cores to the training loop. Best effort.
inline void lower_thread_priority() {
  (void)::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), 10);
}

/// Bytes per positioned read or write of the parallel file I/O: large requests that still let
/// several threads share one big tensor.
constexpr int64_t kIoPieceBytes = int64_t{8} << 20;

/// Bytes to write at a file offset.
struct WriteSpan {
  const uint8_t* data = nullptr;
  int64_t size = 0;
  int64_t offset = 0;  ///< in the file
};

/// Called on the writing thread for each piece of a span before it is written: (span index,
/// offset of the piece in the span, its bytes, their count). Checksums are computed here, while
/// the bytes are in the cache, on as many threads as write.
using PieceFn = std::function<void(size_t, int64_t, const uint8_t*, int64_t)>;

/// Writes `spans` into `file` on up to `threads` threads, cut into pieces of `piece_bytes` from
/// each span's start, starting each piece's write-back at once (PosixFile::start_writeback). The
/// caller fsyncs.
inline void write_spans(PosixFile& file, const std::vector<WriteSpan>& spans, int threads, int64_t piece_bytes,
                        const PieceFn& on_piece = {}) {
  TORCH_CHECK(piece_bytes > 0, "titan: write_spans needs piece_bytes > 0, got ", piece_bytes);
  struct Piece {
    size_t span;
    int64_t begin, size;
  };
  std::vector<Piece> pieces;
  for (size_t i = 0; i < spans.size(); ++i)
    for (int64_t begin = 0; begin < spans[i].size; begin += piece_bytes)
      pieces.push_back(Piece{i, begin, std::min(piece_bytes, spans[i].size - begin)});
  run_tasks(threads, pieces.size(), [&](size_t k) {
    const Piece& piece = pieces[k];
    const WriteSpan& span = spans[piece.span];
    const uint8_t* bytes = span.data + piece.begin;
    if (on_piece) on_piece(piece.span, piece.begin, bytes, piece.size);
    file.write_at(bytes, static_cast<size_t>(piece.size), span.offset + piece.begin);
    file.start_writeback(span.offset + piece.begin, piece.size);
  });
}

/// fsyncs a directory, so that the entries created or renamed in it are durable.
inline void sync_directory(const std::string& path) {
  PosixFile dir(path, O_RDONLY | O_DIRECTORY);
  dir.sync();
}

/// Removes `path` and everything below it; nothing if it does not exist. (Not
/// std::filesystem::remove_all: LibTorch's libraries export their own copy of it, which crashes on
/// non-empty directories when it is the one the dynamic linker binds.)
inline void remove_tree(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return;
  auto remove_one = [](const char* entry, const struct stat*, int, struct FTW*) { return ::remove(entry); };
  TORCH_CHECK(::nftw(path.c_str(), remove_one, 16, FTW_DEPTH | FTW_PHYS) == 0, "titan checkpoint: cannot remove '",
              path, "': ", std::strerror(errno));
}

/// Writes `text` to `path` atomically: a temporary file, fsync, rename, fsync of the directory.
inline void write_file_atomically(const std::string& dir, const std::string& name, const std::string& text) {
  const std::string tmp = dir + "/." + name + ".tmp";
  {
    PosixFile file(tmp, O_WRONLY | O_CREAT | O_TRUNC);
    file.write_at(text.data(), text.size(), 0);
    file.sync();
  }
  const std::string path = dir + "/" + name;
  TORCH_CHECK(::rename(tmp.c_str(), path.c_str()) == 0, "titan checkpoint: renaming '", tmp, "' to '", path,
              "' failed: ", std::strerror(errno));
  sync_directory(dir);
}

}  // namespace detail
}  // namespace titan
