// Splitting a kernel's work over the host's cores.
//
// The kernels run once per layer and step, microseconds apart with other XLA ops in between, so a worker woken
// from sleep for each (as XLA's thread pool does) costs about as much as the work it takes. These workers spin
// for a while after each piece of work before they sleep, so the next kernel finds them awake.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace jaxserve {

class Workers {
 public:
  // The process's workers (one fewer than the cores; made again in a forked child, which has none running).
  static Workers& Get() {
    static std::mutex made;
    static Workers* workers = nullptr;
    std::lock_guard<std::mutex> lock(made);
    if (workers == nullptr || workers->pid_ != getpid()) workers = new Workers();  // never freed: threads detach
    return *workers;
  }

  // Runs part(begin, end) over [0, n) in up to `parts` contiguous pieces (no more than the cores), one on this
  // thread, and returns when all are done. Where another kernel is splitting its work at the same time, runs
  // all of it on this thread.
  template <typename Part>
  void Split(int64_t n, int64_t parts, const Part& part) {
    parts = std::max<int64_t>(1, std::min<int64_t>({parts, n, static_cast<int64_t>(threads_) + 1}));
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (parts == 1 || !busy.owns_lock()) {
      part(int64_t{0}, n);
      return;
    }
    const int64_t per = (n + parts - 1) / parts;
    Job job{[&](int64_t p) { part(p * per, std::min(n, (p + 1) * per)); }, parts};
    job_.store(&job);
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    job.Claim();
    while (job.pending.load() > 0) Pause();
    // No worker may still hold the job when it goes out of scope: each announces itself (claiming_) before it
    // reads job_, so after this store one that read &job is counted, and one that reads after it gets null.
    job_.store(nullptr);
    while (claiming_.load() > 0) Pause();
  }

 private:
  struct Job {
    std::function<void(int64_t)> task;
    int64_t parts;
    std::atomic<int64_t> next{0}, pending{parts};

    void Claim() {
      for (int64_t p; (p = next.fetch_add(1)) < parts;) {
        task(p);
        pending.fetch_sub(1);
      }
    }
  };

  Workers() : pid_(getpid()), threads_(std::max(1u, std::thread::hardware_concurrency()) - 1) {
    for (unsigned i = 0; i < threads_; ++i) std::thread([this] { Loop(); }).detach();
  }

  static void Pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }

  void Loop() {
    uint64_t seen = generation_.load();
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
      while (generation_.load() == seen && std::chrono::steady_clock::now() < until) {
        for (int i = 0; i < 64; ++i) Pause();
      }
      if (generation_.load() == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
      }
      seen = generation_.load();
      claiming_.fetch_add(1);
      if (Job* job = job_.load()) job->Claim();
      claiming_.fetch_sub(1);
    }
  }

  const pid_t pid_;
  const unsigned threads_;
  std::mutex busy_, mu_;
  std::condition_variable wake_;
  // (All atomics sequentially consistent: the hand-over of job_ relies on it.)
  std::atomic<uint64_t> generation_{0};
  std::atomic<Job*> job_{nullptr};
  std::atomic<int> claiming_{0};
};

}  // namespace jaxserve
