// The CUDA engine (csrc/cuda/recurrence_engine.h) and its kernels compiled for the CPU and
// run under a small emulation of CUDA's block model: the 256 threads of a block are fibers that
// __syncthreads switches between, and a __shared__ array is a static one that the threads
// of a block share (the blocks of a launch run one after another). A cooperative launch (the
// persistent kernels; a cluster launch is one too, the grid being the cluster) makes every
// thread of every block a fiber at once, gives each block its own dynamic shared memory,
// which the other blocks can write (distributed shared memory), and runs the blocks one
// after another between grid barriers, in an order that alternates from one barrier to the
// next. It checks the engine's loops and the kernels' indexing, staging, cross-warp
// reduction, barriers and cell epilogues on machines without a GPU
// (tests/test_cuda_emulated.py); it says nothing about speed.
#include <ATen/OpMathType.h>
#include <torch/extension.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace emulation {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

// The threads are fibers on the calling thread: the scheduler resumes each in turn until it
// reaches __syncthreads, the grid barrier or its end, so after a round every thread of a
// block stands at the same barrier, which is what __syncthreads promises.
Dim3 threadIdx, blockIdx;
Dim3 blockDim{256, 1, 1};

constexpr size_t kStackBytes = 256 * 1024;
ucontext_t scheduler;
std::vector<ucontext_t> fibers;
std::vector<std::unique_ptr<char[]>> stacks;  // not zeroed: pages are touched only as used
std::vector<char> finished, at_grid;
std::vector<std::vector<unsigned char>> block_shared;  // a cooperative launch's, per block
unsigned current = 0;
const std::function<void()>* body = nullptr;

void syncthreads() { swapcontext(&fibers[current], &scheduler); }

// Whether grid barriers wait (off: a test shows that the kernels' results depend on them).
bool grid_barriers = true;

void grid_sync() {
  if (!grid_barriers) return;
  at_grid[current] = 1;
  swapcontext(&fibers[current], &scheduler);
}

void fiber_main() {
  (*body)();
  finished[current] = 1;
  swapcontext(&fibers[current], &scheduler);  // never resumed again
}

// Fibers [0, n) made ready to run the kernel from its start.
void start_fibers(unsigned n, const std::function<void()>& kernel) {
  fibers.resize(n);
  stacks.resize(n);
  finished.assign(n, 0);
  at_grid.assign(n, 0);
  body = &kernel;
  for (unsigned f = 0; f < n; ++f) {
    if (!stacks[f]) stacks[f].reset(new char[kStackBytes]);
    getcontext(&fibers[f]);
    fibers[f].uc_stack.ss_sp = stacks[f].get();
    fibers[f].uc_stack.ss_size = kStackBytes;
    fibers[f].uc_link = nullptr;
    makecontext(&fibers[f], fiber_main, 0);
  }
}

// Runs the block (bx, by), whose threads are fibers [base, base + blockDim.x), until each has
// ended or waits at the grid barrier. Between barriers the threads run one after another, in
// turn forwards and backwards, so that a read of another thread's write lacking a barrier
// goes wrong one way.
void run_block(unsigned base, unsigned bx, unsigned by) {
  const unsigned n = blockDim.x;
  for (bool running = true, forwards = true; running; forwards = !forwards) {
    running = false;
    for (unsigned k = 0; k < n; ++k) {
      const unsigned f = base + (forwards ? k : n - 1 - k);
      if (finished[f] || at_grid[f]) continue;
      current = f;
      threadIdx = {f - base, 0, 0};
      blockIdx = {bx, by, 0};
      swapcontext(&scheduler, &fibers[f]);
      running = running || !(finished[f] || at_grid[f]);
    }
    if (!running) break;
    for (unsigned f = base; f < base + n; ++f) {
      if (at_grid[f])
        throw std::runtime_error("emulation: a block's threads wait at different barriers");
    }
  }
}

// Runs kernel() as every thread of every block of a grid(x, y) launch of 256-thread
// blocks, one block after another.
void launch(unsigned grid_x, unsigned grid_y, const std::function<void()>& kernel) {
  for (unsigned by = 0; by < grid_y; ++by) {
    for (unsigned bx = 0; bx < grid_x; ++bx) {
      start_fibers(blockDim.x, kernel);
      run_block(0, bx, by);
      for (char g : at_grid) {
        if (g)
          throw std::runtime_error("emulation: a grid barrier in a launch that is not cooperative");
      }
    }
  }
}

// A cooperative launch of grid_x blocks with shared_bytes of dynamic shared memory each
// (filled with 0xff bytes, NaN in every floating type, so that a read before a write shows).
// Between two grid barriers every block runs to the next one, the blocks in increasing order
// after an even number of barriers and in decreasing order after an odd one.
void launch_cooperative(unsigned grid_x, size_t shared_bytes, const std::function<void()>& kernel) {
  const unsigned n = blockDim.x;
  start_fibers(grid_x * n, kernel);
  block_shared.assign(grid_x, std::vector<unsigned char>(shared_bytes, 0xff));
  for (unsigned phase = 0;; ++phase) {
    for (unsigned k = 0; k < grid_x; ++k) {
      const unsigned b = phase % 2 == 0 ? k : grid_x - 1 - k;
      run_block(b * n, b, 0);
    }
    unsigned ended = 0;
    for (unsigned f = 0; f < grid_x * n; ++f) ended += finished[f];
    if (ended == grid_x * n) return;
    if (ended > 0)
      throw std::runtime_error("emulation: threads ended while others wait at the grid barrier");
    at_grid.assign(grid_x * n, 0);
  }
}

}  // namespace emulation

using emulation::blockDim;
using emulation::blockIdx;
using emulation::threadIdx;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __syncthreads() emulation::syncthreads()

namespace rnn_fused::cuda::persistent {
template <class A>
A* shared_memory() {
  return reinterpret_cast<A*>(emulation::block_shared[emulation::blockIdx.x].data());
}
inline void grid_barrier() { emulation::grid_sync(); }
// A cluster launch here is a cooperative one: the grid is the cluster.
template <class A>
A* shared_memory_of(int rank) {
  return reinterpret_cast<A*>(emulation::block_shared[rank].data());
}
inline void cluster_barrier() { emulation::grid_sync(); }
}  // namespace rnn_fused::cuda::persistent

#include "cuda/fused_step.cuh"
#include "cuda/persistent_step.cuh"
#include "cuda/recurrence_engine.h"
#include "op_adapters.h"

namespace {

using namespace rnn_fused;
using namespace rnn_fused::cuda;

CellKind kind_of(const std::string& mode) { return parse_mode(mode); }

void launch(const fused::Grid& g, const std::function<void()>& kernel) {
  emulation::launch(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), kernel);
}

template <class T>
T* ptr(const at::Tensor& t) {
  return t.numel() == 0 ? nullptr : t.data_ptr<T>();
}

// One fused forward step over h_prev's rows; writes into the given tensors, which the test
// allocates (poisoned) so that it can see every element written or left alone. Half types
// take xg and c in float, as the engine keeps them. block_rows: the rows of a block (4, 8, 16
// or 32; the engine takes the fewest that hold the step's rows, fused::with_forward_rows).
void forward_step(const std::string& mode, const at::Tensor& h_prev, const at::Tensor& w_hh,
                  const at::Tensor& xg, const at::Tensor& b_ih, const at::Tensor& b_hh,
                  const at::Tensor& c, const at::Tensor& saved, const at::Tensor& h,
                  const at::Tensor& h_state, const at::Tensor& h_next, int64_t n_next,
                  int64_t block_rows) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h_prev.scalar_type(), "forward_step", [&] {
        using T = scalar_t;
        using A = at::opmath_type<T>;
        ForwardStep<T, A> s{};
        s.n = h_prev.size(0);
        s.H = h_prev.size(1);
        s.xg = ptr<A>(xg);
        s.b_ih = ptr<T>(b_ih);
        s.b_hh = ptr<T>(b_hh);
        s.h_prev = ptr<T>(h_prev);
        s.ld_h_prev = s.H;
        s.c = ptr<A>(c);
        s.saved = ptr<T>(saved);
        s.ld_saved = saved.numel() == 0 ? 0 : saved.size(1);
        s.h = ptr<T>(h);
        s.ld_h = s.H;
        s.h_state = ptr<T>(h_state);
        s.h_next = ptr<T>(h_next);
        s.n_next = n_next;
        s.ld_state = s.H;
        dispatch_cell(kind_of(mode), [&](auto tag) {
          using Cell = typename decltype(tag)::template Cell<A>;
          const auto run = [&](auto rows) {
            constexpr int kRows = decltype(rows)::value;
            launch(fused::forward_grid<Cell::kGates, kRows>(s.n, s.H),
                   [&] { fused_forward_step_kernel<Cell, T, A, kRows>(s, w_hh.data_ptr<T>()); });
          };
          TORCH_CHECK(block_rows == 4 || block_rows == 8 || block_rows == 16 || block_rows == 32,
                      "block_rows: 4, 8, 16 or 32");
          if (block_rows == 4) {
            run(std::integral_constant<int, 4>{});
          } else if (block_rows == 8) {
            run(std::integral_constant<int, 8>{});
          } else if (block_rows == 16) {
            run(std::integral_constant<int, 16>{});
          } else {
            run(std::integral_constant<int, 32>{});
          }
        });
      });
}

// One fused backward step: rows [0, n) of the step, the product dg_next W_hh over
// dg_next's rows. Half types take dh, dc, dg_next, dx and dhh in float.
void backward_step(const std::string& mode, int64_t n, const at::Tensor& dg_next,
                   const at::Tensor& w_hh, const at::Tensor& dh, const at::Tensor& grad_out,
                   const at::Tensor& dc, const at::Tensor& saved, const at::Tensor& h_prev,
                   const at::Tensor& dx, const at::Tensor& dhh) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "backward_step",
                                  [&] {
                                    using T = scalar_t;
                                    using A = at::opmath_type<T>;
                                    BackwardStep<T, A> s{};
                                    s.n = n;
                                    s.H = dh.size(1);
                                    s.dh = ptr<A>(dh);
                                    s.ld_dh = s.H;
                                    s.grad_out = ptr<T>(grad_out);
                                    s.ld_grad_out = s.H;
                                    s.dc = ptr<A>(dc);
                                    s.saved = ptr<T>(saved);
                                    s.ld_saved = saved.numel() == 0 ? 0 : saved.size(1);
                                    s.h_prev = ptr<T>(h_prev);
                                    s.ld_h_prev = s.H;
                                    s.dx = ptr<A>(dx);
                                    s.dhh = ptr<A>(dhh);
                                    const int64_t rows_gemm = dg_next.size(0);
                                    dispatch_cell(kind_of(mode), [&](auto tag) {
                                      using Cell = typename decltype(tag)::template Cell<A>;
                                      launch(fused::backward_grid(n, rows_gemm, s.H), [&] {
                                        fused_backward_step_kernel<Cell, T, A>(
                                            s, ptr<A>(dg_next), rows_gemm, w_hh.data_ptr<T>());
                                      });
                                    });
                                  });
}

bool persistent_launches = true;

// The persistent launch the engine would ask for: (blocks, shared bytes, cluster) for a
// layer of `mode` in dtype's type, hidden size H, steps of `rows` rows.
std::tuple<int64_t, int64_t, bool> persistent_plan(const std::string& mode,
                                                   const at::Tensor& dtype_of, int64_t H,
                                                   int64_t rows, bool backward) {
  std::tuple<int64_t, int64_t, bool> plan;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype_of.scalar_type(), "persistent_plan", [&] {
        using T = scalar_t;
        using A = at::opmath_type<T>;
        dispatch_cell(kind_of(mode), [&](auto tag) {
          using Cell = typename decltype(tag)::template Cell<A>;
          const auto keep = [&](const auto& l) { plan = {l.blocks, l.shared_bytes, l.cluster}; };
          if (backward) {
            FusedBackwardStep<T, A> r{};
            r.step.n = rows;
            keep(persistent_backward_launch<Cell, T, A>({r}, H, true));
          } else {
            ForwardStep<T, A> s{};
            s.n = rows;
            keep(persistent_forward_launch<Cell, T, A>({s}, H, true));
          }
        });
      });
  return plan;
}

// The engine's device here: products as plain loops (in the accumulation type), copies
// with memcpy, and the same kernels as on the GPU under the block emulation above.
struct HostDevice {
  template <class T, class CT>
  void gemm(bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
            int64_t ldb, CT* C, int64_t ldc, bool accumulate) {
    using Acc = at::opmath_type<T>;
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < N; ++j) {
        Acc sum = accumulate ? static_cast<Acc>(C[i * ldc + j]) : Acc(0);
        for (int64_t k = 0; k < K; ++k) {
          const T b = trans_b ? B[j * ldb + k] : B[k * ldb + j];
          sum += static_cast<Acc>(A[i * lda + k]) * static_cast<Acc>(b);
        }
        C[i * ldc + j] = static_cast<CT>(sum);
      }
    }
  }
  void copy(void* dst, const void* src, int64_t bytes) { std::memcpy(dst, src, bytes); }
  bool tf32() const { return false; }

  template <class Cell, class T, class A>
  void forward_pointwise(const ForwardStep<T, A>& s, const A* hg) {
    emulation::launch(blocks_for(s.n * s.H), 1, [&] { forward_step_kernel<Cell>(s, hg); });
  }
  template <class Cell, class T, class A>
  void backward_pointwise(const BackwardStep<T, A>& s) {
    emulation::launch(blocks_for(s.n * s.H), 1, [&] { backward_step_kernel<Cell>(s); });
  }
  template <class Cell, class T, class A>
  void layer_norm_forward(const ForwardStep<T, A>& s, A* xg, A* hg, const T* gains,
                          int64_t raw_offset) {
    emulation::launch(static_cast<unsigned>(s.n), 1,
                      [&] { layer_norm_forward_step_kernel<Cell>(s, xg, hg, gains, raw_offset); });
  }
  template <class Cell, class T, class A>
  void layer_norm_backward(const BackwardStep<T, A>& s, const LayerNormBackward<T, A>& b) {
    emulation::launch(static_cast<unsigned>(s.n), 1,
                      [&] { layer_norm_backward_step_kernel<Cell>(s, b); });
  }
  template <class T, class A>
  void add_rows(int64_t count, const T* grad_out, const A* state, T* out) {
    emulation::launch(blocks_for(count), 1,
                      [&] { add_rows_kernel<T, A>(count, grad_out, state, out); });
  }
  template <class Cell, class T, class A>
  void fused_forward(const ForwardStep<T, A>& s, const T* w_hh) {
    fused::with_forward_rows(s.n, [&](auto rows) {
      constexpr int kRows = decltype(rows)::value;
      launch(fused::forward_grid<Cell::kGates, kRows>(s.n, s.H),
             [&] { fused_forward_step_kernel<Cell, T, A, kRows>(s, w_hh); });
    });
  }
  template <class Cell, class T, class A>
  void fused_backward(const FusedBackwardStep<T, A>& r, const T* w_hh) {
    launch(fused::backward_grid(r.step.n, r.rows_gemm, r.step.H),
           [&] { fused_backward_step_kernel<Cell, T, A>(r.step, r.dg_next, r.rows_gemm, w_hh); });
  }
  // The persistent kernels, cooperative or as one cluster (set_persistent_launches(false):
  // declined, as a device that cannot run them does, so that the engine's fallback is tested
  // too).
  template <class Cell, class T, class A>
  bool persistent_forward(const std::vector<ForwardStep<T, A>>& steps, const T* w_hh, int64_t H,
                          bool cluster) {
    return run_persistent(persistent_forward_launch<Cell, T, A>(steps, H, cluster), steps, w_hh, H);
  }
  template <class Cell, class T, class A>
  bool persistent_backward(const std::vector<FusedBackwardStep<T, A>>& steps, const T* w_hh,
                           int64_t H, bool cluster) {
    return run_persistent(persistent_backward_launch<Cell, T, A>(steps, H, cluster), steps, w_hh,
                          H);
  }
  template <class Step, class T>
  bool run_persistent(const PersistentLaunch<Step, T>& l, const std::vector<Step>& steps,
                      const T* w_hh, int64_t H) {
    if (!persistent_launches) return false;
    const auto count = static_cast<int64_t>(steps.size());
    emulation::launch_cooperative(static_cast<unsigned>(l.blocks), l.shared_bytes,
                                  [&] { l.kernel(steps.data(), count, w_hh, H, l.rows); });
    return true;
  }
};

// The CUDA operators' host code on CPU tensors (same arguments and results).
ForwardResult engine_forward(const Problem& p, const LayerArgs& a, bool train) {
  HostDevice dev;
  return forward_engine(dev, p, a, train);
}

BackwardResult engine_backward(const Problem& p, const BackwardArgs& a) {
  HostDevice dev;
  return backward_engine(dev, p, a);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_step", &forward_step);
  m.def("backward_step", &backward_step);
  m.def("forward", &forward_adapter<engine_forward>);
  m.def("backward", &backward_adapter<engine_backward>);
  m.def("persistent_plan", &persistent_plan);
  m.def("set_persistent_launches", [](bool on) { persistent_launches = on; });
  m.def("set_grid_barriers", [](bool on) { emulation::grid_barriers = on; });
}
