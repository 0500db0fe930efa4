// Row-major GEMM on raw pointers for the CPU recurrence.
//
// The per-step GEMMs are small (often a matrix-vector product), so the dispatcher and
// tensor bookkeeping of at::mm would cost as much as the product itself. We call the
// BLAS that libtorch_cpu exports (sgemm_/dgemm_, column-major, 32-bit sizes), and fall
// back to at::mm through tensor views when a torch build exports none.
#pragma once

#include <ATen/ATen.h>

#include <climits>
#include <cstdint>

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

namespace detail {

inline int blas_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, "rnn_fused: ", what, " = ", v,
              " does not fit the 32-bit BLAS interface");
  return static_cast<int>(v);
}

template <class T>
void fallback_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                   int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t r, int64_t cl, int64_t ld, bool t) {
    auto m_ = at::from_blob(const_cast<T*>(p), {t ? cl : r, t ? r : cl}, {ld, 1}, opts);
    return t ? m_.t() : m_;
  };
  auto out = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  auto prod = at::mm(view(a, m, k, lda, ta), view(b, k, n, ldb, tb));
  if (beta == T(0)) {
    out.copy_(prod.mul_(alpha));
  } else {
    out.mul_(beta).add_(prod, alpha);
  }
}

}  // namespace detail

// C = alpha * op(A) @ op(B) + beta * C, all row-major; op(X) is X or X^T per ta / tb.
// With beta == 0, C is written without being read (it may hold garbage).
template <class T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  const char transa = tb ? 'T' : 'N';
  const char transb = ta ? 'T' : 'N';
  const int M = detail::blas_int(n, "n"), N = detail::blas_int(m, "m"),
            K = detail::blas_int(k, "k");
  const int LDA = detail::blas_int(ldb, "ldb"), LDB = detail::blas_int(lda, "lda"),
            LDC = detail::blas_int(ldc, "ldc");
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&transa, &transb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&transa, &transb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
      return;
    }
  }
  detail::fallback_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace rnn_fused::cpu
