// A small std::thread parallel-for: no OpenMP runtime to clash with numba's or torch's.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace pyqshare {

// Calls fn(task) for every task in [0, n_tasks) on up to num_threads threads, the caller being one of
// them. Tasks are handed out through an atomic counter, so callers that want results independent of the
// thread count must make each task's output depend only on its index (fixed chunking, no shared
// accumulators). The first exception thrown by any task stops the hand-out and is rethrown here.
template <class Fn>
void parallel_for(std::size_t n_tasks, int num_threads, Fn&& fn) {
  const std::size_t n_workers =
      std::min<std::size_t>(n_tasks, static_cast<std::size_t>(std::max(num_threads, 1)));
  if (n_workers <= 1) {
    for (std::size_t t = 0; t < n_tasks; ++t) fn(t);
    return;
  }
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&]() {
    for (;;) {
      if (failed.load(std::memory_order_relaxed)) return;
      const std::size_t t = next.fetch_add(1, std::memory_order_relaxed);
      if (t >= n_tasks) return;
      try {
        fn(t);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        failed.store(true, std::memory_order_relaxed);
        return;
      }
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(n_workers - 1);
  for (std::size_t i = 0; i + 1 < n_workers; ++i) threads.emplace_back(work);
  work();
  for (auto& th : threads) th.join();
  if (error) std::rethrow_exception(error);
}

// Splits [0, n) into chunks of `chunk` elements (the last may be shorter): the task count for parallel_for.
inline std::size_t n_chunks(std::size_t n, std::size_t chunk) { return chunk == 0 ? 0 : (n + chunk - 1) / chunk; }

}  // namespace pyqshare
