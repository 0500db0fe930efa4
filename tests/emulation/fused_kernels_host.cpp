// The fused CUDA step kernels (csrc/cuda/fused_step.cuh) compiled for the CPU and run under
// a small emulation of CUDA's block model: the 256 threads of a block are real threads,
// __syncthreads is a barrier among them, and a __shared__ array is a static one that the
// threads of a block share (the blocks of a launch run one after another). It checks the
// kernels' indexing, staging, cross-warp reduction and cell epilogues on machines without
// a GPU (tests/test_fused_kernels_emulated.py); it says nothing about their speed.
#include <ATen/OpMathType.h>
#include <torch/extension.h>

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace emulation {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim{256, 1, 1};

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  int64_t generation_ = 0;
};

Barrier* block_barrier = nullptr;

inline void syncthreads() { block_barrier->wait(); }

// Runs kernel() as every thread of every block of a grid(x, y) launch of 256-thread blocks.
template <class Kernel>
void launch(unsigned grid_x, unsigned grid_y, const Kernel& kernel) {
  for (unsigned by = 0; by < grid_y; ++by) {
    for (unsigned bx = 0; bx < grid_x; ++bx) {
      Barrier barrier(static_cast<int>(blockDim.x));
      block_barrier = &barrier;
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < blockDim.x; ++t) {
        threads.emplace_back([&, t] {
          threadIdx = {t, 0, 0};
          blockIdx = {bx, by, 0};
          kernel();
        });
      }
      for (auto& thread : threads) thread.join();
    }
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

#include "cuda/fused_step.cuh"

namespace {

using namespace rnn_fused;
using namespace rnn_fused::cuda;

CellKind kind_of(const std::string& mode) {
  if (mode == "LSTM") return CellKind::LSTM;
  if (mode == "GRU") return CellKind::GRU;
  if (mode == "RNN_TANH") return CellKind::RNN_TANH;
  TORCH_CHECK(mode == "RNN_RELU", "unknown mode ", mode);
  return CellKind::RNN_RELU;
}

unsigned blocks(int64_t count, int64_t per_block) {
  return static_cast<unsigned>((count + per_block - 1) / per_block);
}

template <class T>
T* ptr(const at::Tensor& t) {
  return t.numel() == 0 ? nullptr : t.data_ptr<T>();
}

// One fused forward step over h_prev's rows; writes into the given tensors, which the test
// allocates (poisoned) so that it can see every element written or left alone. Half types
// take xg and c in float, as the engine keeps them.
void forward_step(const std::string& mode, const at::Tensor& h_prev, const at::Tensor& w_hh,
                  const at::Tensor& xg, const at::Tensor& b_ih, const at::Tensor& b_hh,
                  const at::Tensor& c, const at::Tensor& saved, const at::Tensor& h,
                  const at::Tensor& h_state, const at::Tensor& h_next, int64_t n_next) {
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
          using Shape = fused::ForwardShape<Cell::kGates>;
          emulation::launch(blocks(s.H, Shape::BU), blocks(s.n, Shape::BM),
                            [&] { fused_forward_step_kernel<Cell, T, A>(s, w_hh.data_ptr<T>()); });
        });
      });
}

// One fused backward step: rows [0, n) of the step, the product dg_next W_hh over
// dg_next's rows. Half types take dh and dc in float.
void backward_step(const std::string& mode, int64_t n, const at::Tensor& dg_next,
                   const at::Tensor& w_hh, const at::Tensor& dh, const at::Tensor& grad_out,
                   const at::Tensor& dc, const at::Tensor& saved, const at::Tensor& h_prev,
                   const at::Tensor& dx, const at::Tensor& dhh) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, saved.scalar_type(), "backward_step", [&] {
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
        s.dx = ptr<T>(dx);
        s.dhh = ptr<T>(dhh);
        const int64_t rows_gemm = dg_next.size(0);
        dispatch_cell(kind_of(mode), [&](auto tag) {
          using Cell = typename decltype(tag)::template Cell<A>;
          using Shape = fused::BackwardShape;
          const int64_t rows = std::max(n, rows_gemm);
          emulation::launch(blocks(s.H, Shape::BC), blocks(rows, Shape::BM), [&] {
            fused_backward_step_kernel<Cell, T, A>(s, ptr<T>(dg_next), rows_gemm,
                                                   w_hh.data_ptr<T>());
          });
        });
      });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_step", &forward_step);
  m.def("backward_step", &backward_step);
}
