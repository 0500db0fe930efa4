// Float64 products of a register-blocked AVX-512 kernel of our own, for the products that
// gemm.cpp would give to MKL one block at a time: a small problem's steps (a cell's call, a
// layer of one step) and the blocks of larger products that the threads split. MKL packs
// both operands, scales C and dispatches on every call; at these sizes that took as long as
// its sums (perf: its kernel was 40% of its time in a float64 LSTMCell(51) model at batch 97).
#pragma once

#include <cstdint>

namespace rnn_fused::cpu {

// Whether this build has the kernel (AVX-512 builds).
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kF64Kernel = true;
#else
constexpr bool kF64Kernel = false;
#endif

// Whether f64_product_here takes a float64 product of this shape: AVX-512 builds, on AMD
// CPUs (where it was measured against MKL), for a C of at least two rows and two columns
// and up to kF64KernelMaxMacs multiply-adds. RNN_FUSED_F64_KERNEL=0 or =1 overrides the
// CPU rule (the tests run both ways).
bool f64_kernel_takes(int64_t M, int64_t N, int64_t K);

// C[M, N] = op(A) @ op(B) (accumulate: C += ...) on the calling thread, op(X) = X^T when
// trans_x, all row-major with leading dimensions lda, ldb, ldc (kF64Kernel builds only). Every
// value of C is one sum over k in order (added to C's value last when accumulating), whatever the
// blocks a caller splits C into: the bits do not depend on the threads.
void f64_product_here(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const double* A,
                      int64_t lda, const double* B, int64_t ldb, double* C, int64_t ldc,
                      bool accumulate);

}  // namespace rnn_fused::cpu
