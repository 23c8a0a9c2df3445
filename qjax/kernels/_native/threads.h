// qjax's helper threads for its native kernels (onednn_ukernel.cc, sat16_gemm.cc): one
// call's work is a set of items claimed from an atomic counter by the calling thread and
// the helpers, so a helper that starts late (or never) only leaves more to the caller.
//
// Helpers: one per further core this process may run on (at most 3), started on first
// use; after a call each spins g_spin_us (QJAX_SPIN_US, qjax sets it when it loads the
// library) for the next one, the next layer of a forward then needs no futex wake-up
// (~30 us of the int8 MLP's 124 at batch 32 on the 2-core AMD EPYC), then sleeps on a
// condition variable. XLA's intra-op pool was tried first: on the 2-core machine under
// load its task started on average 826 us after being scheduled at M = 256, after the
// caller had done every item alone; g_use_helpers = 0 still uses it (to measure against).
//
// Each library including this has its own helpers and settings (internal linkage).
#pragma once

#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace {

struct Work {
  virtual ~Work() = default;
  virtual void RunItem(int64_t i) = 0;
  virtual void Release() {}  // after a thread ran items of this call (per-thread state)
  int64_t items = 0;
  int64_t macs = 0;  // multiply-adds of the whole call (decides the helper threads)
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::string error;  // the first exception's message (torch throws c10::Error)
};

inline void Drain(Work& j) {
  bool ran = false;
  for (;;) {
    int64_t i = j.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= j.items) break;
    ran = true;
    try {
      j.RunItem(i);
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(j.mu);
      if (j.error.empty()) j.error = e.what();
    }
    j.done.fetch_add(1, std::memory_order_release);
  }
  if (ran) j.Release();
}

std::atomic<int> g_use_helpers{1};         // 0: XLA's intra-op pool instead
std::atomic<int64_t> g_parallel_calls{0};  // calls that handed work to other threads (tests)
std::atomic<int64_t> g_spin_us{0};         // us a helper spins for the next job

// A spinning helper costs no wake-up: calls from 2^18 multiply-adds go parallel then
// (the int8 MLP 784-1024-1024-10 at batch 1, Zen 5, 44 -> 33 us; 2^20: 37 us; sleeping
// helpers at 2^18 made it 51 us).
constexpr int64_t kSpinMacs = int64_t{1} << 18;

inline int64_t ParallelMacs(int64_t sleeping) {
  bool spin = g_spin_us.load(std::memory_order_relaxed) > 0 && g_use_helpers.load() != 0;
  return spin && kSpinMacs < sleeping ? kSpinMacs : sleeping;
}

class Helpers {
 public:
  static Helpers& Get() {
    static Helpers* h = new Helpers();  // never destroyed: detached threads use it
    return *h;
  }
  int count() const { return count_; }
  void Post(const std::shared_ptr<Work>& job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = job;
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
  }

 private:
  Helpers() {
    unsigned hw = std::thread::hardware_concurrency();
    count_ = hw > 1 ? static_cast<int>(hw - 1) : 0;
    if (count_ > 3) count_ = 3;
    for (int i = 0; i < count_; ++i) std::thread([this] { Loop(); }).detach();
  }
  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      // The next call's job comes within microseconds in a forward: catch it awake.
      // Yield while spinning: a helper the scheduler put on the caller's core (the other
      // one busy a moment before, e.g. with torch's spinning OpenMP worker) would hold
      // that core against the caller for its time slice (measured: the int8 MLP at batch
      // 32 ran ~470 us for the first 5 calls after another library's, 95 us alone; ~160
      // with the yield); sched_yield returns at once where nothing else is runnable.
      int64_t spin = g_spin_us.load(std::memory_order_relaxed);
      if (spin > 0) {
        auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin);
        while (gen_.load(std::memory_order_acquire) == seen &&
               std::chrono::steady_clock::now() < until)
          std::this_thread::yield();
      }
      std::shared_ptr<Work> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return gen_.load(std::memory_order_relaxed) != seen; });
        seen = gen_.load(std::memory_order_relaxed);
        job = job_;
      }
      if (job) Drain(*job);  // a job its caller already finished leaves nothing to claim
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<Work> job_;
  std::atomic<uint64_t> gen_{0};
  int count_ = 0;
};

// Runs every item of a call, on more threads for calls of at least `sleeping`
// multiply-adds (kSpinMacs while helpers spin).
inline xla::ffi::Error RunItems(xla::ffi::ThreadPool& pool, const std::shared_ptr<Work>& job,
                                const char* who, int64_t sleeping) {
  if (job->items > 1 && job->macs >= ParallelMacs(sleeping)) {
    g_parallel_calls.fetch_add(1, std::memory_order_relaxed);
    if (g_use_helpers.load() && Helpers::Get().count() > 0) Helpers::Get().Post(job);
    else pool.Schedule([job] { Drain(*job); });
  }
  Drain(*job);
  // Items claimed by other threads are running; wait for them (no new ones start).
  // Yield rather than spin: on busy cores the task may need this very core.
  for (int spins = 0; job->done.load(std::memory_order_acquire) < job->items; ++spins) {
    if (spins < 64) _mm_pause();
    else std::this_thread::yield();
  }
  if (!job->error.empty())
    return xla::ffi::Error::Internal(std::string(who) + ": " + job->error);
  return xla::ffi::Error::Success();
}

}  // namespace
