// A team of threads that stays together across the steps of a chunk: one parallel region
// per chunk, and a barrier between the phases of a step, instead of a fork and a join per
// phase. At small batches the fork and join cost more than a step's work.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#include "bf16_dot.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rnn_fused::cpu {

struct Team {
  int id = 0;
  int size = 1;

  // Items [begin, end) of n for this thread: a static split, so that a thread gets the same
  // items (and keeps their weights in its cache) at every step.
  int64_t begin(int64_t n) const { return n * id / size; }
  int64_t end(int64_t n) const { return n * (id + 1) / size; }

  void barrier() const {
#ifdef _OPENMP
    if (size > 1) {
#pragma omp barrier
    }
#endif
  }
};

// Runs body(team) on `threads` threads (at most torch's thread count). body must not throw.
template <class F>
void with_team(int threads, const F& body) {
#ifdef _OPENMP
  threads = std::max(1, std::min(threads, at::get_num_threads()));
  if (threads > 1 && !at::in_parallel_region()) {
#pragma omp parallel num_threads(threads)
    {
      const Team team{omp_get_thread_num(), omp_get_num_threads()};
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
