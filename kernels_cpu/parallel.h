// Splitting a kernel's work over XLA's CPU thread pool and the calling thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jaxserve {

// Runs part(begin, end) over [0, n) in `parts` (at most the pool's threads) contiguous pieces and returns when
// all are done. Pieces are claimed from a counter by this thread and by tasks it schedules on the pool; it waits
// only for pieces another thread has claimed, never for a task still queued: when several devices' programs run
// kernels at once (simulated devices, tensor parallel on CPU), the pool's threads may all be inside such a wait,
// and waiting for queued tasks there deadlocked. A task that starts after every piece is claimed does nothing.
template <typename Part>
void SplitOverPool(xla::ffi::ThreadPool& pool, int64_t n, int64_t parts, const Part& part) {
  parts = std::max<int64_t>(1, std::min<int64_t>({parts, n, pool.num_threads()}));
  const int64_t per = (n + parts - 1) / parts;
  struct Progress {
    std::atomic<int64_t> claimed{0}, finished{0};
  };
  auto progress = std::make_shared<Progress>();  // outlives this call for tasks that start late
  auto work = [progress, parts, per, n, &part] {
    for (int64_t p; (p = progress->claimed.fetch_add(1, std::memory_order_acq_rel)) < parts;) {
      part(p * per, std::min(n, (p + 1) * per));
      progress->finished.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t p = 1; p < parts; ++p) pool.Schedule([work] { work(); });
  work();
  while (progress->finished.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

}  // namespace jaxserve
