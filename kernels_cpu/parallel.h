// Splitting a kernel's work over XLA's CPU thread pool and the calling thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jaxserve {

// Runs part(begin, end) over [0, n) in `parts` (at most the pool's threads) contiguous pieces, one on this thread,
// and returns when all are done.
template <typename Part>
void SplitOverPool(xla::ffi::ThreadPool& pool, int64_t n, int64_t parts, const Part& part) {
  parts = std::max<int64_t>(1, std::min<int64_t>({parts, n, pool.num_threads()}));
  const int64_t per = (n + parts - 1) / parts;
  std::atomic<int64_t> pending(parts - 1);
  for (int64_t p = 1; p < parts; ++p) {
    pool.Schedule([&, p] {
      part(p * per, std::min(n, (p + 1) * per));
      pending.fetch_sub(1, std::memory_order_release);
    });
  }
  part(int64_t{0}, std::min(n, per));
  while (pending.load(std::memory_order_acquire) > 0) std::this_thread::yield();
}

}  // namespace jaxserve
