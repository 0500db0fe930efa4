// C = A @ B (or C += A @ B) on row-major raw pointers: the one matrix product of the CPU
// recurrence. Operands are never transposed here; callers pass transposed copies, which
// are cheap next to the products (weights once per call, activations once per chunk).
#pragma once

#include <cstdint>

namespace rnn_fused::cpu {

// C[M, N] = A[M, K] @ B[K, N] (accumulate: C += ...), leading dimensions lda, ldb, ldc.
// float32 runs oneDNN's JIT micro-kernels (through ATen's brgemm) in cache blocks split
// over threads where the CPU has AVX-512; everything else goes to the BLAS of libtorch.
template <class T>
void matmul(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
            T* C, int64_t ldc, bool accumulate);

}  // namespace rnn_fused::cpu
