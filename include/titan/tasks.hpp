#pragma once
// titan/tasks.hpp: the thread pool titan's file I/O runs on (checkpoints, safetensors), for a
// program's own parallel host work (the example trainers tokenize their corpus with it).
//
//   titan::run_tasks(titan::io_threads_or_default(0), files.size(), [&](size_t i) { read(files[i]); });

#include <titan/detail/tasks.hpp>

namespace titan {

/// run_tasks(threads, count, task): task(0) ... task(count - 1) on up to `threads` threads (the
/// caller's included), each taking the next index; after the first error no new task starts, and
/// the error is rethrown once every thread has stopped.
using detail::run_tasks;

/// default_io_threads(): threads per rank for file I/O when asked for 0: the cores, at most 4.
using detail::default_io_threads;

/// io_threads_or_default(threads): `threads` when positive, else default_io_threads().
using detail::io_threads_or_default;

}  // namespace titan
