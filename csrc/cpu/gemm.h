// Matrix products of the CPU recurrence on row-major raw pointers. Operands are never
// transposed here; callers pass transposed or packed copies, which are cheap next to the
// products (weights once per call, activations once per chunk of steps).
//
// C added last: a product that accumulates (C += A B) adds C's value to the finished sums of
// A B, not its sums to C's value. A chain of adds that starts from C rounds each add to C's
// size: MKL's gemv with beta = 1 had 1.5-2.3x the error of the same sums added to C after,
// and a GRU's dh_{t-1} (its direct part, then W_hh's sums) 4.7x torch.nn's at batch 1.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "bf16_dot.h"
#include "panels.h"

namespace rnn_fused::cpu {

// C[M, N] = A[M, K] @ B[K, N] (accumulate: C += ...), leading dimensions lda, ldb, ldc.
// float32 runs oneDNN's JIT micro-kernels (through ATen's brgemm) in cache blocks split
// over threads where the CPU has AVX-512; float64 and other CPUs use libtorch's BLAS.
// chain: on brgemm, the k of each sum's chains of fused multiply-adds, whose results are then
// added in order (0: the kernels' own blocks, 512; kGradientChain for the weight gradients).
template <class T>
void matmul(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
            int64_t ldc, bool accumulate, int64_t chain = 0);

// The chains of a weight gradient's sums over a chunk's rows (matmul's chain). The rows of a
// call in one chain rounded at each of its adds: a GRU's W_hh gradient at T=100 B=64 H=256
// (6400 rows) had 2.3x torch.nn's float32 error, whose sums run per step; in chains of 512
// rows 2.3x still, of 128 1.2x. The forward and the data gradients keep chains of 512: of 128
// they cost 4% of an LSTM's forward and backward at T=100 B=64 H=512 (one thread, AMD EPYC).
constexpr int64_t kGradientChain = 128;

// Multiply-adds a thread takes at the least before a product is split over threads: below
// it a parallel region costs more than it saves, and a process that never opens one stays
// safe to fork (libgomp's threads do not survive a fork: a child's first parallel region
// would wait for them forever; torch.nn's small products do not open one either).
constexpr int64_t kMinParallelMacs = int64_t(1) << 16;

// f(begin, end) over items [0, n) of `macs` multiply-adds each: split over threads when
// every thread gets at least kMinParallelMacs, else on the calling thread, no region opened.
template <class F>
void split_over_threads(int64_t n, int64_t macs, const F& f) {
  macs = std::max<int64_t>(macs, 1);
  if (n * macs < 2 * kMinParallelMacs || at::get_num_threads() == 1) return f(0, n);
  at::parallel_for(0, n, (kMinParallelMacs + macs - 1) / macs, f);
}

// C = op(A) @ op(B) (accumulate: C += ...) through libtorch's BLAS, on the operands as they
// are stored (op(X) is X^T when trans_x): for small problems, where transposing or packing a
// weight would cost more than the products that read it.
template <class T>
void blas_product(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
                  int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate);

// c[j] = a . W[j, :] for j < N (one row against N rows of a float32 W, ldw apart) on the
// calling thread, by the kernel that blas_product runs for one row against W^T on AVX-512,
// so that the two give the same bits. AVX-512 builds only (kRowKernel).
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kRowKernel = true;
void row_times_wt_here(int64_t N, int64_t K, const float* a, const float* W, int64_t ldw, float* c);
#else
constexpr bool kRowKernel = false;
#endif

// C = op(A) @ op(B) (accumulate: C += ...) in one call of libtorch's BLAS held to the calling
// thread: for work split over threads by the caller, in blocks set by the shape alone (the
// bits then do not depend on the threads).
template <class T>
void blas_product_here(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
                       int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate);

// C[M, N] = A[M, K] @ op(W) (accumulate: C += ...) for a bfloat16 or float16 W as stored
// (op(W) = W^T when trans, W [N, K]; else W, [K, N]; rows contiguous), each value of W widened
// to float32 as it is read: the sums are those of float32 products with W's exact values.
// For the products of a half-type call's small problem at M <= kHalfWeightRows rows (a
// cell's step at batch 1 to 4), whose weights a float32 copy per call costs more than the
// products do. At more rows, a bfloat16 W on bfloat16 dot products (bf16_times_w_rows,
// bf16_times_w) with A rounded to bfloat16, as packed products round it: where the CPU
// has them (has_bf16_dot), for a bfloat16 call's small problem (StepWeight's bf16). Split over
// threads by blocks of C's columns.
constexpr int64_t kHalfWeightRows = 4;
void half_weight_product(bool trans, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                         const at::Tensor& W, float* C, int64_t ldc, bool accumulate);
// The same on an A already rounded to bfloat16 (bf16_round_rows: lda even) for a bfloat16 W
// at more than kHalfWeightRows rows: an A that more than one product reads.
void half_weight_product(bool trans, int64_t M, int64_t N, int64_t K, const at::BFloat16* A,
                         int64_t lda, const at::Tensor& W, float* C, int64_t ldc, bool accumulate);

// W[M, N] (+)= G^T A for G [rows, M] and A [rows, N] (rows ldg and lda apart) rounded to
// bfloat16, on bfloat16 dot products (A in bfloat16 panels): the weight gradients of a bfloat16
// call's small problem, whose operands packed products would round the same way. Split over
// threads by blocks of W's rows and panels.
void bf16_weight_product(int64_t M, int64_t N, int64_t rows, const float* G, int64_t ldg,
                         const float* A, int64_t lda, float* W, bool accumulate);
// The same into bfloat16 W (not accumulated: the float32 sums rounded to nearest even, as
// Tensor::to rounds them).
void bf16_weight_product(int64_t M, int64_t N, int64_t rows, const float* G, int64_t ldg,
                         const float* A, int64_t lda, at::BFloat16* W);
// The same into bfloat16 W on G^T already rounded (g_t [M, ld_g], ld_g even, a zero after an
// odd count of rows: bf16_transposed), for a G that both weight gradients read.
void bf16_weight_product(int64_t M, int64_t N, int64_t rows, const at::BFloat16* g_t, int64_t ld_g,
                         const float* A, int64_t lda, at::BFloat16* W);

// G^T [M, rows rounded up to even] for bfloat16 G [rows, M] (rows ldg apart), in a buffer from
// the cache, a zero after each row of odd `rows`: on the threads by blocks of G's columns.
at::Tensor bf16_transposed(int64_t rows, int64_t M, const at::BFloat16* G, int64_t ldg);
// The same for float32 G, each value rounded to bfloat16 (to nearest even) on the way.
at::Tensor bf16_transposed(int64_t rows, int64_t M, const float* G, int64_t ldg);

// C[M, N] = A^T @ B (accumulate: C += ...) for A [K, M] and B [K, N] as stored, through
// libtorch's BLAS: the weight gradients of large problems. Threads take blocks of C's rows
// whose sizes depend on M alone, one BLAS call each, held to one thread (through MKL's
// per-thread setting, where libtorch has MKL), so that the bits do not depend on the number
// of threads: MKL's own threads split the sum over K.
template <class T>
void blas_at_b(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
               T* C, int64_t ldc, bool accumulate);

// C[M, N] = A[M, K] @ B (accumulate: C += ...), B packed with one group. bfloat16 panels
// take A rounded to bfloat16 (T is float32 then).
template <class T>
void matmul(int64_t M, const T* A, int64_t lda, const Panels& B, T* C, int64_t ldc, bool accumulate,
            int64_t chain = 0);

// The same for bfloat16 panels on an A already in bfloat16, its rows read in pairs as they
// are (K and lda even).
void matmul(int64_t M, const at::BFloat16* A, int64_t lda, const Panels& B, float* C, int64_t ldc,
            bool accumulate);

// C[M, N] = A^T @ B (accumulate: C += ...) for float32 A [K, M] (rows lda apart) and
// bfloat16 panels B of one group: A transposed and rounded in one pass (bf16_round_transposed),
// for the weight gradients, whose sums run over a chunk's rows.
void bf16_matmul_transposed(int64_t M, const float* A, int64_t lda, const Panels& B, float* C,
                            int64_t ldc, bool accumulate);
// The same for a bfloat16 A, transposed as it is (a bfloat16 call's input, which the backward
// reads in its own dtype): the same bits as its float32 copy would give.
void bf16_matmul_transposed(int64_t M, const at::BFloat16* A, int64_t lda, const Panels& B,
                            float* C, int64_t ldc, bool accumulate);

// C[M, columns of panel j of group g] = A[M, K] @ that panel of B (accumulate: C += ...), on
// the calling thread: for work already split over threads by the caller. `next`: the panel
// of B the caller reads after this one (float32), fetched into L2 while this one runs.
template <class T>
void panel_product(int64_t M, const T* A, int64_t lda, const Panels& B, int64_t g, int64_t j, T* C,
                   int64_t ldc, bool accumulate = false, const T* next = nullptr);

// The same for bfloat16 panels on an A rounded beforehand (bf16_round_rows, lda even): for an
// A that many panels read.
void panel_product(int64_t M, const at::BFloat16* A, int64_t lda, const Panels& B, int64_t g,
                   int64_t j, float* C, int64_t ldc, bool accumulate = false);

}  // namespace rnn_fused::cpu
