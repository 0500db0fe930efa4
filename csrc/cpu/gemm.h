// Matrix products of the CPU recurrence on row-major raw pointers. Operands are never
// transposed here; callers pass transposed or packed copies, which are cheap next to the
// products (weights once per call, activations once per chunk of steps).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace rnn_fused::cpu {

// C[M, N] = A[M, K] @ B[K, N] (accumulate: C += ...), leading dimensions lda, ldb, ldc.
// float32 runs oneDNN's JIT micro-kernels (through ATen's brgemm) in cache blocks split
// over threads where the CPU has AVX-512; float64 and other CPUs use libtorch's BLAS.
template <class T>
void matmul(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
            int64_t ldc, bool accumulate);

// A right-hand side used at every step, repacked as column panels: panel p holds
// B[:, p*kPanel : (p+1)*kPanel] as a contiguous [K, kPanel] block (zero padded). Read
// step after step, a panel streams in order and stays in the cache of the thread that
// owns it; a plain row-major B with a power-of-two row length would thrash cache sets.
struct Panels {
  static constexpr int64_t kPanel = 64;
  at::Tensor data;  // [ceil(N / kPanel), K, kPanel]
  int64_t K = 0, N = 0;
};

// b: [K, N] with any strides (a transposed view is fine).
Panels pack_panels(const at::Tensor& b);

// C[M, N] = A[M, K] @ B (accumulate: C += ...).
template <class T>
void matmul(int64_t M, const T* A, int64_t lda, const Panels& B, T* C, int64_t ldc,
            bool accumulate);

}  // namespace rnn_fused::cpu
