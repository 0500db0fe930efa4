// Float32 and float64 products on register tiles of our own (AVX-512 or AVX2), for the
// products that gemm.cpp would give to MKL one block at a time: a small problem's steps (a
// cell's call, a layer of one step) and the blocks of larger products that the threads split.
// On the AMD kinds MKL packs both operands, scales C and dispatches on every call, and at
// these sizes that took as long as its sums (perf: its kernel was 40% of its time in a
// float64 LSTMCell(51) model at batch 97 on Zen 4; on Zen 3, 16% against 20% in packing,
// scaling and dispatch); its float32 kernel there is its AVX2 one.
#pragma once

#include <cstdint>

namespace rnn_fused::cpu {

// Whether this build has the kernel (AVX-512 and AVX2 builds).
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kTileKernel = true;
#else
constexpr bool kTileKernel = false;
#endif

// Whether tile_product_here takes a product of this shape (trans_b: op(B) = B^T): kTileKernel
// builds, on AMD CPUs, for a C of at least two rows and two columns and up to
// kTileKernelMaxMacs multiply-adds; AVX2 builds (AMD EPYC Zen 3) within tighter limits of K,
// of C's size and of rows by B^T (tile_gemm.cpp says what was measured).
// Not on the Intel kind, where MKL's AVX-512 GEMM wins: LSTMCell(256) at batch 64 under
// no_grad took 0.73x MKL's speed on the tiles in float32, 0.68x in float64, LSTMCell(512)
// at batch 256 0.82-0.86x, the per-call client 0.96-0.99x (Intel Xeon).
// RNN_FUSED_TILE_KERNEL=0 or =1 in the environment (read at the first product) overrides the
// CPU rule, as force_tile_kernel does.
bool tile_kernel_takes(int64_t M, int64_t N, int64_t K, bool trans_b);

// The kernel on (1) or off (0) wherever the shape allows, or back to the CPU rule (-1): for
// the tests, which run both ways. A flag, not the environment, because products ask at every
// step.
void force_tile_kernel(int mode);

// C[M, N] = op(A) @ op(B) (accumulate: C += ...) on the calling thread, op(X) = X^T when
// trans_x, all row-major with leading dimensions lda, ldb, ldc (kTileKernel builds only).
// Every value of C is a sum of chains of fused multiply-adds over k in order, 128 k each,
// added in order (and to C's value last when accumulating), whatever the blocks a caller
// splits C into: the bits do not depend on the threads. T: float or double.
template <class T>
void tile_product_here(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
                       int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate);

}  // namespace rnn_fused::cpu
