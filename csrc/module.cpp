// The Python module rnn_fused._C. Importing it loads this library, whose static
// registrations (ops.cpp, autograd.cpp, cpu/, cuda/) add the operators to torch.ops.rnn_fused,
// and gives Python direct doors to rnn_fused::layer (python_doors.cpp: through the dispatcher,
// without the per-call cost of torch.ops' argument matching), both directions of a layer at
// once (layer_pair), the cells' layout facts, the CPU workspace cache's
// controls and, for the tests, the tile kernel of small products.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/extension.h>

#include <array>
#include <tuple>
#include <vector>

#include "cpu/bf16_dot.h"
#include "cpu/tile_gemm.h"
#include "cpu/workspace.h"
#include "op_adapters.h"
#include "python_doors.h"

namespace {

// The CPU kernels are compiled for the SIMD level of the machine that built them (see
// setup.py). Refuse to load on a CPU without it instead of dying on an illegal instruction.
#if defined(CPU_CAPABILITY_AVX512)
#define RF_BUILD_SIMD "AVX-512"
#elif defined(CPU_CAPABILITY_AVX2)
#define RF_BUILD_SIMD "AVX2"
#else
#define RF_BUILD_SIMD "no SIMD extension"
#endif

// C (+)= op(A) @ op(B) by the tile kernel of small products (cpu/tile_gemm.h), for the tests:
// float32 or float64 CPU matrices with contiguous rows, all of one dtype.
at::Tensor tile_product(const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b,
                        at::Tensor c, bool accumulate) {
  TORCH_CHECK(rnn_fused::cpu::kTileKernel, "cpu_tile_product needs an AVX-512 or AVX2 build");
  const at::ScalarType dtype = c.scalar_type();
  for (const at::Tensor* t : std::array<const at::Tensor*, 3>{&a, &b, &c}) {
    TORCH_CHECK(t->dim() == 2 && t->scalar_type() == dtype &&
                    (dtype == at::kFloat || dtype == at::kDouble) && t->is_cpu() &&
                    t->stride(1) == 1 && t->stride(0) >= std::max<int64_t>(t->size(1), 1),
                "cpu_tile_product: expected 2-D CPU matrices of float32 or float64 (all of one "
                "dtype) with contiguous rows, got ",
                t->sizes(), " ", t->scalar_type(), " strides ", t->strides());
  }
  const int64_t M = trans_a ? a.size(1) : a.size(0), K = trans_a ? a.size(0) : a.size(1);
  const int64_t N = trans_b ? b.size(0) : b.size(1);
  TORCH_CHECK((trans_b ? b.size(1) : b.size(0)) == K && c.size(0) == M && c.size(1) == N,
              "cpu_tile_product: op(a) ", M, " x ", K, ", op(b) of ", K,
              " rows and c of the product's shape expected, got a ", a.sizes(), ", b ", b.sizes(),
              ", c ", c.sizes());
  AT_DISPATCH_FLOATING_TYPES(dtype, "rnn_fused_tile_product", [&] {
    rnn_fused::cpu::tile_product_here<scalar_t>(trans_a, trans_b, M, N, K, a.data_ptr<scalar_t>(),
                                                a.stride(0), b.data_ptr<scalar_t>(), b.stride(0),
                                                c.data_ptr<scalar_t>(), c.stride(0), accumulate);
  });
  return c;
}

bool cpu_has_build_simd() {
#if defined(CPU_CAPABILITY_AVX512)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#elif defined(CPU_CAPABILITY_AVX2)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return true;
#endif
}

using rnn_fused::LayerResult;
using rnn_fused::OptTensor;
template <class T>
using Pair = std::vector<T>;  // [forward direction, reverse direction]

// Both directions of a bidirectional layer, without a graph, at once on two threads, each
// running its direction's steps alone: a step of one direction split over two threads wastes
// a quarter of them at T=50 B=32 H=256 (LSTM, Intel Xeon: 10.2 ms on two threads against 14.8
// on one). Nested in this parallel region, each call runs on its own thread (the engine's
// teams and parallel loops see the region). Each thread takes the caller's thread-local
// state (grad and inference mode, dispatch keys), as at::launch does, then goes below
// autograd. The bits are those of two calls one after the other, which do not depend on
// threads.
std::tuple<LayerResult, LayerResult> both_directions(
    std::string_view mode, const at::Tensor& input, const Pair<OptTensor>& hx,
    const Pair<OptTensor>& cx, const Pair<at::Tensor>& w_ih, const Pair<at::Tensor>& w_hh,
    const Pair<OptTensor>& b_ih, const Pair<OptTensor>& b_hh, const Pair<OptTensor>& w_hr,
    const OptTensor& batch_sizes, const Pair<OptTensor>& zoneout,
    const Pair<OptTensor>& layer_norm) {
  for (const size_t n : {hx.size(), cx.size(), w_ih.size(), w_hh.size(), b_ih.size(), b_hh.size(),
                         w_hr.size(), zoneout.size(), layer_norm.size()}) {
    TORCH_CHECK(n == 2, "rnn_fused: layer_pair takes two of each per-direction argument, got ", n);
  }
  // The tracer's state stays on the calling thread: a traced call on another thread recursed
  // in the tracer until the stack overflowed.
  TORCH_CHECK(!torch::jit::tracer::isTracing(),
              "rnn_fused: layer_pair runs a direction on another thread, where torch.jit.trace "
              "cannot follow; under tracing call rnn_fused::layer for each direction");
  std::array<LayerResult, 2> results;
  const at::ThreadLocalState caller;
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard as_caller(caller);
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t d = begin; d < end; ++d) {
      const rnn_fused::LayerArgs a{mode,    input,      hx[d],        cx[d],   w_ih[d],
                                   w_hh[d], b_ih[d],    b_hh[d],      w_hr[d], batch_sizes,
                                   d == 1,  zoneout[d], layer_norm[d]};
      auto [output, h_n, c_n, saved, h_prev] = rnn_fused::call_forward(a, /*train=*/false);
      results[d] = {output, h_n, c_n};
    }
  });
  return {results[0], results[1]};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  if (!cpu_has_build_simd()) {
    throw pybind11::import_error("rnn_fused was built for a CPU with " RF_BUILD_SIMD
                                 " and this CPU lacks it; rebuild here with `make build`");
  }
  using namespace rnn_fused;
  add_python_doors(m.ptr());  // layer and cell
  m.def("layer_pair", &both_directions, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Both directions of a bidirectional layer without a graph, on a thread each: "
        "((output, h_n, c_n), (output, h_n, c_n)).");
  m.def(
      "gates", [](std::string_view mode) { return gates_of(parse_mode(mode)); },
      "Gate blocks of width hidden_size per row of a cell's pre-activations.");
  m.def(
      "saved_blocks",
      [](std::string_view mode, bool proj, bool layer_norm) {
        return saved_layout(parse_mode(mode), proj, 1, layer_norm).blocks();
      },
      "Blocks of width hidden_size per row of the forward's `saved` workspace.");
  m.def(
      "workspace_dtype",
      [](const std::string& device, at::ScalarType dtype) {
        return workspace_dtype(c10::Device(device).type(), dtype);
      },
      "The dtype of the forward's workspace (saved, h_prev) for an input on device of dtype.");
  m.def("cpu_bf16_dot", &cpu::has_bf16_dot,
        "Whether bfloat16 products on this CPU run on AVX-512 BF16 dot products.");
  m.def("cpu_bf16_tiles", &cpu::bf16_tiles_allowed,
        "Whether bfloat16 products of 2 rows or more run on AMX tiles on this CPU (not with "
        "RNN_FUSED_BF16_TILES=0).");
  m.def(
      "cpu_tile_kernel", [] { return rnn_fused::cpu::kTileKernel; },
      "Whether this build has the tile kernel of small products (AVX-512 builds).");
  m.def("cpu_force_tile_kernel", &cpu::force_tile_kernel,
        "The tile kernel on (1), off (0) or as the CPU kind chooses (-1), where shapes allow.");
  m.def("cpu_tile_product", &tile_product,
        "c (+)= op(a) @ op(b) by the tile kernel of small products, in place (tests).");
  m.def("empty_workspace_cache", &cpu::empty_workspace_cache,
        "Frees the freed CPU blocks kept for the next training calls.");
  m.def("cached_workspace_bytes", &cpu::cached_workspace_bytes,
        "Bytes of freed CPU blocks kept for the next training calls.");
}
