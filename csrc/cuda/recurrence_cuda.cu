// The CUDA operators: the engine of recurrence_engine.h on a device made of cuBLAS (on
// PyTorch's handle, so with PyTorch's TF32 setting) and CUDA kernels on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../op_adapters.h"
#include "../problem.h"
#include "fused_step.cuh"
#include "persistent_step.cuh"
#include "recurrence_engine.h"
#include "step_kernels.cuh"

namespace rnn_fused::cuda {
namespace {

template <class T>
constexpr cudaDataType_t cuda_type() {
  if constexpr (std::is_same_v<T, double>) return CUDA_R_64F;
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  if constexpr (std::is_same_v<T, at::Half>) return CUDA_R_16F;
  return CUDA_R_16BF;
}

int blas_int(int64_t v) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, "rnn_fused: matrix size ", v, " does not fit cuBLAS");
  return static_cast<int>(v);
}

// Row-major C[M, N] = A[M, K] @ (trans_b ? B^T : B), or C += ...; A and B of type T, C of
// type CT (T, or float for half types). cuBLAS is column-major: compute C^T = op(B)^T A^T,
// on PyTorch's handle for the current stream (at::cuda::getCurrentCUDABlasHandle(), which
// also carries PyTorch's TF32 setting), fetched once per operator call.
template <class T, class CT>
void gemm(cublasHandle_t handle, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
          int64_t lda, const T* B, int64_t ldb, CT* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int m = blas_int(N), n = blas_int(M), k = blas_int(K);
  const int la = blas_int(std::max<int64_t>(ldb, 1)), lb = blas_int(std::max<int64_t>(lda, 1));
  const int lc = blas_int(ldc);
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    static_assert(std::is_same_v<T, CT>);
    const T one = 1, beta = accumulate ? 1 : 0;
    if constexpr (std::is_same_v<T, double>) {
      TORCH_CUDABLAS_CHECK(
          cublasDgemm(handle, op_b, CUBLAS_OP_N, m, n, k, &one, B, la, A, lb, &beta, C, lc));
    } else {
      TORCH_CUDABLAS_CHECK(
          cublasSgemm(handle, op_b, CUBLAS_OP_N, m, n, k, &one, B, la, A, lb, &beta, C, lc));
    }
  } else {
    const float one = 1, beta = accumulate ? 1 : 0;
    TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, op_b, CUBLAS_OP_N, m, n, k, &one, B, cuda_type<T>(),
                                      la, A, cuda_type<T>(), lb, &beta, C, cuda_type<CT>(), lc,
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
}

// The engine's device on CUDA: cuBLAS on PyTorch's handle and kernels on the current
// stream, both fetched once per operator call.
class CudaDevice {
 public:
  CudaDevice()
      : stream_(at::cuda::getCurrentCUDAStream()), blas_(at::cuda::getCurrentCUDABlasHandle()) {}

  template <class T, class CT>
  void gemm(bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
            int64_t ldb, CT* C, int64_t ldc, bool accumulate) {
    cuda::gemm<T, CT>(blas_, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }
  void copy(void* dst, const void* src, int64_t bytes) {
    C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
  }
  // PyTorch sets the handle's math mode from its TF32 flags (old or new API) when it hands
  // the handle out, so the handle itself says whether float32 GEMMs take tensor cores.
  bool tf32() const {
    cublasMath_t mode = CUBLAS_DEFAULT_MATH;
    TORCH_CUDABLAS_CHECK(cublasGetMathMode(blas_, &mode));
    return (static_cast<int>(mode) & 0xF) == CUBLAS_TF32_TENSOR_OP_MATH;
  }

  template <class Cell, class T, class A>
  void forward_pointwise(const ForwardStep<T, A>& s, const A* hg) {
    forward_step_kernel<Cell><<<blocks_for(s.n * s.H), kThreads, 0, stream_>>>(s, hg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <class Cell, class T, class A>
  void backward_pointwise(const BackwardStep<T, A>& s) {
    backward_step_kernel<Cell><<<blocks_for(s.n * s.H), kThreads, 0, stream_>>>(s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <class Cell, class T, class A>
  void layer_norm_forward(const ForwardStep<T, A>& s, A* xg, A* hg, const T* gains,
                          int64_t raw_offset) {
    layer_norm_forward_step_kernel<Cell>
        <<<static_cast<unsigned>(s.n), kThreads, 0, stream_>>>(s, xg, hg, gains, raw_offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <class Cell, class T, class A>
  void layer_norm_backward(const BackwardStep<T, A>& s, const LayerNormBackward<T, A>& b) {
    layer_norm_backward_step_kernel<Cell>
        <<<static_cast<unsigned>(s.n), kThreads, 0, stream_>>>(s, b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <class T, class A>
  void add_rows(int64_t count, const T* grad_out, const A* state, T* out) {
    add_rows_kernel<T, A><<<blocks_for(count), kThreads, 0, stream_>>>(count, grad_out, state, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <class Cell, class T, class A>
  void fused_forward(const ForwardStep<T, A>& s, const T* w_hh) {
    fused::with_forward_rows(s.n, [&](auto rows) {
      constexpr int kRows = decltype(rows)::value;
      const fused::Grid g = fused::forward_grid<Cell::kGates, kRows>(s.n, s.H);
      fused_forward_step_kernel<Cell, T, A, kRows>
          <<<dim3(g.x, g.y), fused::kBlock, 0, stream_>>>(s, w_hh);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <class Cell, class T, class A>
  void fused_backward(const FusedBackwardStep<T, A>& r, const T* w_hh) {
    const fused::Grid g = fused::backward_grid(r.step.n, r.rows_gemm, r.step.H);
    fused_backward_step_kernel<Cell, T, A>
        <<<dim3(g.x, g.y), fused::kBlock, 0, stream_>>>(r.step, r.dg_next, r.rows_gemm, w_hh);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <class Cell, class T, class A>
  bool persistent_forward(const std::vector<ForwardStep<T, A>>& steps, const T* w_hh, int64_t H,
                          bool cluster) {
    cluster = cluster && clusters_supported();
    return launch_persistent(persistent_forward_launch<Cell, T, A>(steps, H, cluster), steps, w_hh,
                             H) ||
           (cluster && launch_persistent(persistent_forward_launch<Cell, T, A>(steps, H, false),
                                         steps, w_hh, H));
  }
  template <class Cell, class T, class A>
  bool persistent_backward(const std::vector<FusedBackwardStep<T, A>>& steps, const T* w_hh,
                           int64_t H, bool cluster) {
    cluster = cluster && clusters_supported();
    return launch_persistent(persistent_backward_launch<Cell, T, A>(steps, H, cluster), steps, w_hh,
                             H) ||
           (cluster && launch_persistent(persistent_backward_launch<Cell, T, A>(steps, H, false),
                                         steps, w_hh, H));
  }

 private:
  static bool clusters_supported() { return at::cuda::getCurrentDeviceProperties()->major >= 9; }
  // Whether a launch of `blocks` blocks with shared_bytes each can run now, all blocks at once:
  // not while the stream is being captured (the step records are copied from the host);
  // cooperative: where the device runs cooperative launches and all blocks fit on it at once;
  // cluster: where one cluster of them fits an SM group (the occupancy calculator says).
  bool can_launch(const void* kernel, int64_t shared_bytes, cudaLaunchConfig_t& config,
                  bool cluster) const {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream_, &capture));
    if (capture != cudaStreamCaptureStatusNone) return false;
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    if (shared_bytes > int64_t(prop->sharedMemPerBlockOptin)) return false;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
    if (cluster) {
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
      int clusters = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &config));
      return clusters >= 1;
    }
    if (!prop->cooperativeLaunch) return false;
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, fused::kBlock,
                                                                 shared_bytes));
    return int64_t(per_sm) * prop->multiProcessorCount >= int64_t(config.gridDim.x);
  }
  // One launch of a persistent kernel over the step records, which travel to the device
  // through pinned memory (the host allocator keeps it until the copy is done).
  template <class Step, class T>
  bool launch_persistent(const PersistentLaunch<Step, T>& l, const std::vector<Step>& steps,
                         const T* w_hh, int64_t H) {
    const void* entry = reinterpret_cast<const void*>(l.kernel);
    cudaLaunchAttribute attribute{};
    attribute.id = l.cluster ? cudaLaunchAttributeClusterDimension : cudaLaunchAttributeCooperative;
    if (l.cluster) {
      attribute.val.clusterDim.x = static_cast<unsigned>(l.blocks);
      attribute.val.clusterDim.y = attribute.val.clusterDim.z = 1;
    } else {
      attribute.val.cooperative = 1;
    }
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(l.blocks));
    config.blockDim = dim3(fused::kBlock);
    config.dynamicSmemBytes = static_cast<size_t>(l.shared_bytes);
    config.stream = stream_;
    config.attrs = &attribute;
    config.numAttrs = 1;
    if (!can_launch(entry, l.shared_bytes, config, l.cluster)) return false;
    const auto bytes = static_cast<int64_t>(sizeof(Step) * steps.size());
    at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), steps.data(), bytes);
    const at::Tensor records =
        host.to(at::Device(at::kCUDA, c10::cuda::current_device()), /*non_blocking=*/true);
    const Step* records_p = reinterpret_cast<const Step*>(records.data_ptr());
    int64_t count = static_cast<int64_t>(steps.size()), hidden = H, rows = l.rows;
    void* args[] = {&records_p, &count, &w_hh, &hidden, &rows};
    C10_CUDA_CHECK(cudaLaunchKernelExC(&config, entry, args));
    return true;
  }

  cudaStream_t stream_;
  cublasHandle_t blas_;
};

ForwardResult forward_cuda(const Problem& p, const LayerArgs& a, bool train) {
  const c10::cuda::CUDAGuard guard(a.input.device());
  CudaDevice dev;
  return forward_engine(dev, p, a, train);
}

BackwardResult backward_cuda(const Problem& p, const BackwardArgs& a) {
  const c10::cuda::CUDAGuard guard(a.layer.input.device());
  CudaDevice dev;
  return backward_engine(dev, p, a);
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_fused, CUDA, m) {
  m.impl("forward", &forward_adapter<forward_cuda>);
  m.impl("backward", &backward_adapter<backward_cuda>);
}

}  // namespace rnn_fused::cuda
