// titan_launch: starts N copies of a program as the ranks of one job on this machine, the way
// `torchrun --standalone --no-python --nproc_per_node N` does, for tests and CPU runs.
//
//   titan_launch --nproc 4 [--timeout 600] [--expect-codes 0,3] -- program args...
//
// Sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT (a free
// port), OMP_NUM_THREADS=1, TITAN_DEVICE=cpu and TITAN_BACKEND=gloo (each unless set: titan_launch
// runs CPU jobs, also on a GPU machine), prefixes every output line with "[rank r] ", and
// exits with the first non-zero exit code of any rank. When a rank fails the others get a grace
// period, then are killed. With --expect-codes, nobody is killed early and the launcher succeeds
// iff rank i exits with the i-th code. Past --timeout seconds every rank is killed (exit 124).
// SIGTERM and SIGINT sent to the launcher are forwarded to every rank, as torchrun does (a
// trainer then saves a checkpoint and stops; see docs/training.md).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

namespace {

/// The last SIGTERM / SIGINT received, to forward to the ranks (0 = none pending).
volatile sig_atomic_t g_forward_signal = 0;
extern "C" void remember_signal(int signal_number) { g_forward_signal = signal_number; }

[[noreturn]] void usage(const char* message) {
  std::fprintf(stderr, "titan_launch: %s\nusage: titan_launch --nproc N [--timeout SECONDS] "
               "[--grace SECONDS] [--expect-codes C0,C1,...] -- program [args...]\n", message);
  std::exit(2);
}

int free_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) usage("cannot bind a free port");
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

int parse_int(const char* text, const char* what) {
  char* end = nullptr;
  long value = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || value < 0) {
    std::string message = std::string("bad value '") + text + "' for " + what;
    usage(message.c_str());
  }
  return static_cast<int>(value);
}

struct Rank {
  pid_t pid = -1;
  int out_fd = -1;
  std::string pending;  // output not yet ended by a newline
  bool running = true;
  int code = 0;
};

void flush_lines(Rank& rank, int index, bool all) {
  size_t start = 0;
  for (size_t newline; (newline = rank.pending.find('\n', start)) != std::string::npos; start = newline + 1) {
    std::string line = "[rank " + std::to_string(index) + "] " + rank.pending.substr(start, newline - start + 1);
    fwrite(line.data(), 1, line.size(), stdout);
  }
  rank.pending.erase(0, start);
  if (all && !rank.pending.empty()) {
    std::string line = "[rank " + std::to_string(index) + "] " + rank.pending + "\n";
    fwrite(line.data(), 1, line.size(), stdout);
    rank.pending.clear();
  }
  fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  int nproc = 0, timeout = 600, grace = 30;
  std::vector<int> expected;
  int i = 1;
  for (; i < argc && std::strcmp(argv[i], "--") != 0; ++i) {
    std::string flag = argv[i];
    if (i + 1 >= argc) usage(("missing value for " + flag).c_str());
    if (flag == "--nproc") nproc = parse_int(argv[++i], "--nproc");
    else if (flag == "--timeout") timeout = parse_int(argv[++i], "--timeout");
    else if (flag == "--grace") grace = parse_int(argv[++i], "--grace");
    else if (flag == "--expect-codes") {
      std::stringstream list(argv[++i]);
      for (std::string item; std::getline(list, item, ',');) expected.push_back(parse_int(item.c_str(), "--expect-codes"));
    } else usage(("unknown flag " + flag).c_str());
  }
  if (nproc < 1) usage("--nproc must be at least 1");
  if (i + 1 >= argc) usage("no program after --");
  if (!expected.empty() && static_cast<int>(expected.size()) != nproc) usage("--expect-codes needs one code per rank");
  char** program = argv + i + 1;

  const std::string port = std::to_string(free_port());
  std::vector<Rank> ranks(static_cast<size_t>(nproc));
  for (int r = 0; r < nproc; ++r) {
    int fds[2];
    if (pipe(fds) != 0) usage("pipe failed");
    pid_t pid = fork();
    if (pid == 0) {
      dup2(fds[1], STDOUT_FILENO);
      dup2(fds[1], STDERR_FILENO);
      close(fds[0]);
      close(fds[1]);
      setenv("RANK", std::to_string(r).c_str(), 1);
      setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      setenv("MASTER_ADDR", "127.0.0.1", 1);
      setenv("MASTER_PORT", port.c_str(), 1);
      setenv("OMP_NUM_THREADS", "1", 0);
      // titan_launch runs CPU jobs (tests, scripts/train.sh): Gloo on the CPU, also on a GPU
      // machine, unless the caller says otherwise (TITAN_DEVICE=cuda with TITAN_SHARE_GPUS=1 puts
      // the ranks on the GPUs through Gloo).
      setenv("TITAN_DEVICE", "cpu", 0);
      setenv("TITAN_BACKEND", "gloo", 0);
      execvp(program[0], program);
      std::fprintf(stderr, "titan_launch: cannot run %s: %s\n", program[0], std::strerror(errno));
      _exit(127);
    }
    close(fds[1]);
    ranks[static_cast<size_t>(r)].pid = pid;
    ranks[static_cast<size_t>(r)].out_fd = fds[0];
  }

  struct sigaction action {};
  action.sa_handler = remember_signal;
  sigemptyset(&action.sa_mask);
  for (int signal_number : {SIGTERM, SIGINT}) sigaction(signal_number, &action, nullptr);

  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  auto kill_deadline = clock::time_point::max();
  int first_failure = 0, running = nproc;
  bool timed_out = false;
  while (running > 0) {
    std::vector<pollfd> fds;
    for (auto& rank : ranks)
      if (rank.out_fd >= 0) fds.push_back({rank.out_fd, POLLIN, 0});
    if (!fds.empty()) poll(fds.data(), fds.size(), 100);
    else usleep(100 * 1000);
    if (const int signal_number = g_forward_signal) {
      g_forward_signal = 0;
      std::fprintf(stdout, "titan_launch: forwarding signal %d to every rank\n", signal_number);
      fflush(stdout);
      for (auto& rank : ranks)
        if (rank.running) kill(rank.pid, signal_number);
    }
    for (int r = 0; r < nproc; ++r) {
      auto& rank = ranks[static_cast<size_t>(r)];
      if (rank.out_fd < 0) continue;
      pollfd probe{rank.out_fd, POLLIN, 0};
      if (poll(&probe, 1, 0) <= 0) continue;
      char buffer[4096];
      ssize_t n = read(rank.out_fd, buffer, sizeof(buffer));
      if (n > 0) {
        rank.pending.append(buffer, static_cast<size_t>(n));
        flush_lines(rank, r, false);
      } else {
        flush_lines(rank, r, true);
        close(rank.out_fd);
        rank.out_fd = -1;
      }
    }
    for (int r = 0; r < nproc; ++r) {
      auto& rank = ranks[static_cast<size_t>(r)];
      if (!rank.running) continue;
      int status = 0;
      if (waitpid(rank.pid, &status, WNOHANG) != rank.pid) continue;
      rank.running = false;
      --running;
      rank.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      if (rank.code != 0) {
        std::fprintf(stdout, "titan_launch: rank %d exited with code %d\n", r, rank.code);
        fflush(stdout);
        if (first_failure == 0) first_failure = rank.code;
        if (expected.empty() && kill_deadline == clock::time_point::max())
          kill_deadline = clock::now() + std::chrono::seconds(grace);
      }
    }
    auto now = clock::now();
    if (now - start > std::chrono::seconds(timeout) && !timed_out) {
      std::fprintf(stdout, "titan_launch: timeout after %d s, killing every rank\n", timeout);
      timed_out = true;
      kill_deadline = now;
    }
    if (now >= kill_deadline) {
      for (auto& rank : ranks)
        if (rank.running) kill(rank.pid, SIGKILL);
      kill_deadline = clock::time_point::max() - std::chrono::hours(1);
    }
  }
  for (int r = 0; r < nproc; ++r) {
    auto& rank = ranks[static_cast<size_t>(r)];
    if (rank.out_fd >= 0) {
      char buffer[4096];
      for (ssize_t n; (n = read(rank.out_fd, buffer, sizeof(buffer))) > 0;) rank.pending.append(buffer, static_cast<size_t>(n));
      flush_lines(rank, r, true);
      close(rank.out_fd);
    }
  }
  if (timed_out) return 124;
  if (!expected.empty()) {
    bool all_match = true;
    for (int r = 0; r < nproc; ++r) {
      int code = ranks[static_cast<size_t>(r)].code;
      if (code != expected[static_cast<size_t>(r)]) {
        std::fprintf(stdout, "titan_launch: rank %d exited with %d, expected %d\n", r, code, expected[static_cast<size_t>(r)]);
        all_match = false;
      }
    }
    return all_match ? 0 : 1;
  }
  return first_failure;
}
