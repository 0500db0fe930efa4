// A team of threads that stays together across the steps of a chunk: one parallel region
// per chunk, and a barrier between the phases of a step, instead of a fork and a join per
// phase. At small batches the fork and join cost more than a step's work.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <thread>

#include "bf16_dot.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace rnn_fused::cpu {

// A team's barrier: the last thread to arrive opens the next phase, the others spin on it.
// OpenMP's barrier took 470-1700 cycles a crossing on 2 threads where this one takes about
// 80 (Intel Xeon with AMX, 2 GHz), and a step crosses one to three: forward 1-2.5% faster
// (LSTM T=100 B=1 H=256 float32 and bfloat16, GRU T=200 B=16 H=128).
struct TeamSync {
  alignas(64) std::atomic<int> arrived{0};
  alignas(64) std::atomic<unsigned> phase{0};  // wraps around: only its changes matter

  void wait(int size) {
    const unsigned current = phase.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == size - 1) {
      arrived.store(0, std::memory_order_relaxed);
      phase.store(current + 1u, std::memory_order_release);
      return;
    }
    // Spin about a millisecond, then yield (a preempted teammate needs the core).
    for (int spins = 0; phase.load(std::memory_order_acquire) == current; ++spins) {
      if (spins < kSpins) {
#if defined(__x86_64__)
        _mm_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

  static constexpr int kSpins = 1 << 14;
};

struct Team {
  int id = 0;
  int size = 1;
  TeamSync* sync = nullptr;  // shared by the team when size > 1

  // Items [begin, end) of n for this thread: a static split, so that a thread gets the same
  // items (and keeps their weights in its cache) at every step.
  int64_t begin(int64_t n) const { return n * id / size; }
  int64_t end(int64_t n) const { return n * (id + 1) / size; }

  void barrier() const {
    if (size > 1) sync->wait(size);
  }
};

// Runs body(team) on `threads` threads (at most torch's thread count). body must not throw.
template <class F>
void with_team(int threads, const F& body) {
#ifdef _OPENMP
  threads = std::max(1, std::min(threads, at::get_num_threads()));
  if (threads > 1 && !at::in_parallel_region()) {
    TeamSync sync;
#pragma omp parallel num_threads(threads)
    {
      const Team team{omp_get_thread_num(), omp_get_num_threads(), &sync};
      body(team);
      bf16_tiles_release();
    }
    return;
  }
#endif
  body(Team{});
  bf16_tiles_release();
}

}  // namespace rnn_fused::cpu
