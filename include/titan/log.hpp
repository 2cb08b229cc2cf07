#pragma once
// titan/log.hpp: rank-prefixed logging. info() prints on rank 0 only (unless all ranks are asked
// for); warn() and error() print on every rank, since they usually concern that rank.

#include <c10/util/StringUtil.h>

#include <chrono>
#include <ctime>
#include <iostream>
#include <string>

namespace titan {

/// Writes "[titan 12:00:01 rank 0/2] message" lines to stderr.
class Logger {
 public:
  Logger() = default;
  Logger(int rank, int world_size, bool all_ranks = false)
      : rank_(rank), world_size_(world_size), all_ranks_(all_ranks) {}

  /// Progress and results: rank 0 only, unless the logger was made for all ranks.
  template <typename... Args>
  void info(const Args&... args) const {
    if (rank_ == 0 || all_ranks_) write("", c10::str(args...));
  }
  /// Something odd that the run survives: every rank.
  template <typename... Args>
  void warn(const Args&... args) const {
    write("warning: ", c10::str(args...));
  }
  /// A failure: every rank.
  template <typename... Args>
  void error(const Args&... args) const {
    write("error: ", c10::str(args...));
  }

  int rank() const { return rank_; }
  bool all_ranks() const { return all_ranks_; }

 private:
  void write(const char* level, const std::string& message) const {
    std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
    std::tm parts{};
    gmtime_r(&now, &parts);
    char clock[16];
    std::strftime(clock, sizeof(clock), "%H:%M:%S", &parts);
    std::string line = c10::str("[titan ", clock, " rank ", rank_, "/", world_size_, "] ", level, message, "\n");
    std::cerr << line << std::flush;  // one write per line, so ranks do not interleave mid-line
  }

  int rank_ = 0;
  int world_size_ = 1;
  bool all_ranks_ = false;
};

}  // namespace titan
