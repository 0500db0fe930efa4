#include "gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <climits>
#include <type_traits>

// The Fortran BLAS that libtorch_cpu exports (MKL on x86). Weak, so that a torch build
// without them still loads; we then fall back to at::mm.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc)
    __attribute__((weak));
}

namespace rnn_fused::cpu {
namespace {

// Block sizes of C and of the reduction. A [kBlockK, kBlockN] panel of B (128 KiB) stays
// in L2 while the blocks of A stream past it. On the 2-core AVX-512 CPU of DESIGN.md the
// per-step 64x512x2048 product runs at about 430 GFLOP/s this way, MKL's sgemm at 175.
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 64;
constexpr int64_t kBlockK = 512;

bool use_brgemm() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

void matmul_brgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                   int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const int64_t mb = (M + kBlockM - 1) / kBlockM, nb = (N + kBlockN - 1) / kBlockN;
  at::parallel_for(0, mb * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      // Column-block-major order: consecutive blocks of a thread reuse one panel of B.
      const int64_t i = (blk % mb) * kBlockM, j = (blk / mb) * kBlockN;
      const int64_t m = std::min(kBlockM, M - i), n = std::min(kBlockN, N - j);
      for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
        at::native::cpublas::brgemm(m, n, std::min(kBlockK, K - k0), lda, ldb, ldc,
                                    accumulate || k0 > 0, A + i * lda + k0, B + k0 * ldb + j,
                                    C + i * ldc + j, /*is_vnni=*/false);
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
}

int blas_int(int64_t v) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, "rnn_fused: matrix size ", v,
              " does not fit the 32-bit BLAS interface");
  return static_cast<int>(v);
}

template <class T>
void matmul_blas(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                 int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  // Row-major C = A B is column-major C^T = B^T A^T: pass B first.
  const char no = 'N';
  const int m = blas_int(N), n = blas_int(M), k = blas_int(K);
  const int la = blas_int(ldb), lb = blas_int(lda), lc = blas_int(ldc);
  const T one = 1, beta = accumulate ? 1 : 0;
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) return sgemm_(&no, &no, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&no, &no, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  auto b = at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  accumulate ? c.addmm_(a, b) : c.copy_(at::mm(a, b));
}

}  // namespace

template <class T>
void matmul(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
            T* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, T(0));
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (use_brgemm()) return matmul_brgemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }
  matmul_blas<T>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

template void matmul<float>(int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                            int64_t, float*, int64_t, bool);
template void matmul<double>(int64_t, int64_t, int64_t, const double*, int64_t, const double*,
                             int64_t, double*, int64_t, bool);

}  // namespace rnn_fused::cpu
