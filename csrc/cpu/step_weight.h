// The right-hand side B of the products a recurrence makes with a weight W at every step:
// B = W^T or W. Packed into column panels when a problem repays the packing; otherwise W is
// read as stored, through BLAS (see small_problem in engine.h). A vector W (IndRNN's
// u) is never packed and has no products here: the engine's element-wise steps multiply by it
// in the step (run_forward, run_backward).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "gemm.h"
#include "team.h"
#include "workspace.h"

namespace rnn_fused::cpu {

template <class T>
class StepWeight {
 public:
  // group: columns of B per gate (panels never straddle two gates); 0 for all of them.
  // bf16: products on bfloat16 dot products, which round A to bfloat16 (T is float32): packed
  // as bfloat16 panels, or unpacked a bfloat16 W read as stored at any number of rows. A
  // weight that is packed may have another dtype than T (it is read only to be packed).
  // Unpacked, a weight in a half type (a small problem's: weights_as_stored) is read as
  // stored where its products take at most kHalfWeightRows rows (`rows`: the most they
  // take) or run on the dot products, and converted to T once otherwise.
  // tiles_as_stored: with pack, W (bfloat16, contiguous; B = W^T) is not packed but read as
  // stored by the AMX kernels (stored_rows_for_tiles).
  StepWeight(const at::Tensor& w, bool transpose, bool pack, int64_t group = 0, bool bf16 = false,
             int64_t rows = 0, bool tiles_as_stored = false)
      : diagonal_(w.dim() == 1),
        ld_(diagonal_ ? 1 : w.size(1)),
        transpose_(transpose),
        K_(diagonal_ || transpose ? w.size(-1) : w.size(0)),
        N_(diagonal_ || transpose ? w.size(0) : w.size(1)) {
    constexpr at::ScalarType kDtype = c10::CppTypeToScalarType<T>::value;
    if (pack && !diagonal_ && tiles_as_stored) {
      TORCH_INTERNAL_ASSERT(transpose && bf16);
      panels_ = stored_rows_for_tiles(w, group);
    } else if (pack && !diagonal_) {
      panels_ = pack_panels(transpose ? w.t() : w, group, bf16);
    } else if (w.scalar_type() == kDtype) {
      w_ = w.data_ptr<T>();
    } else if (std::is_same_v<T, float> && !diagonal_ &&
               (rows <= kHalfWeightRows || (bf16 && w.scalar_type() == at::kBFloat16))) {
      half_ = w;
    } else {
      converted_ = buffer_empty(w.sizes(), w.options().dtype(kDtype));
      converted_.copy_(w);
      w_ = converted_.data_ptr<T>();
    }
  }

  bool packed() const { return panels_.data.defined(); }
  const Panels& panels() const { return panels_; }

  // C[M, N] = A[M, K] @ B (accumulate: C += ...) on all threads; called outside a team.
  void product(int64_t M, const T* A, int64_t lda, T* C, int64_t ldc, bool accumulate) const {
    TORCH_INTERNAL_ASSERT(!diagonal_, "an element-wise weight has no products");
    if (packed()) return matmul<T>(M, A, lda, panels_, C, ldc, accumulate);
    if constexpr (std::is_same_v<T, float>) {
      if (half_.defined())
        return half_weight_product(transpose_, M, N_, K_, A, lda, half_, C, ldc, accumulate);
    }
    blas_product<T>(false, transpose_, M, N_, K_, A, lda, w_, ld_, C, ldc, accumulate);
  }

  // C[M, N] = A[M, K] @ B (accumulate: C += ...) in one BLAS call on the calling thread, for a
  // W in T read as stored: for work the caller splits over threads by blocks set by the shape
  // alone.
  void product_here(int64_t M, const T* A, int64_t lda, T* C, int64_t ldc,
                    bool accumulate = false) const {
    TORCH_INTERNAL_ASSERT(w_ != nullptr, "product_here reads a weight in T as stored");
    blas_product_here<T>(false, transpose_, M, N_, K_, A, lda, w_, ld_, C, ldc, accumulate);
  }

  // Whether W is read unpacked in T (as stored, or a half-type weight's copy).
  bool unpacked_in_t() const { return w_ != nullptr; }
#if defined(CPU_CAPABILITY_AVX512)
  // Columns [j0, j1) of one row a times B = W^T, on the calling thread by the kernel that
  // product() runs for one row (the same bits): for a row whose columns the caller splits.
  void row_columns_here(const T* a, int64_t j0, int64_t j1, T* c) const {
    static_assert(std::is_same_v<T, float>, "the row kernel is float32's");
    TORCH_INTERNAL_ASSERT(w_ != nullptr && transpose_);
    row_times_wt_here(j1 - j0, K_, a, w_ + j0 * ld_, ld_, c + j0);
  }
#endif
  // The same on an A rounded to bfloat16 (bf16_round_rows: lda even), on bfloat16 panels or a
  // bfloat16 W read as stored at more than kHalfWeightRows rows.
  void product(int64_t M, const at::BFloat16* A, int64_t lda, float* C, int64_t ldc,
               bool accumulate) const {
    if (!packed()) {
      TORCH_INTERNAL_ASSERT(half_.defined() && M > kHalfWeightRows);
      return half_weight_product(transpose_, M, N_, K_, A, lda, half_, C, ldc, accumulate);
    }
    matmul(M, A, lda, panels_, C, ldc, accumulate);
  }

  // The same, split over a team by column panels (unpacked: by its first thread). The caller
  // puts a barrier after it before C is read.
  void product(const Team& team, int64_t M, const T* A, int64_t lda, T* C, int64_t ldc,
               bool accumulate) const {
    if (!packed()) {
      if (team.id == 0) product(M, A, lda, C, ldc, accumulate);
      return;
    }
    // AMX tiles read A rounded: once per thread for all its panels, not once per panel (an
    // LSTM's backward at T=100 B=64 H=512 rounded dG four times a step on each thread).
    if constexpr (std::is_same_v<T, float>) {
      if (panels_.tiles && M >= kTileMinRows &&
          team.begin(panel_count()) < team.end(panel_count())) {
        int64_t ld_rounded = 0;
        const at::BFloat16* rounded = bf16_rounded_rows(M, K_, A, lda, &ld_rounded);
        return product(team, M, rounded, ld_rounded, C, ldc, accumulate);
      }
    }
    for_team_panels(team, C, [&](int64_t g, int64_t jb, T* c) {
      panel_product<T>(M, A, lda, panels_, g, jb, c, ldc, accumulate);
    });
  }

  // The same on an A already rounded to bfloat16 (bf16_round_rows: lda even, an odd K's pad
  // zero), on bfloat16 panels (unpacked, as product() above, by the team's first thread).
  void product(const Team& team, int64_t M, const at::BFloat16* A, int64_t lda, float* C,
               int64_t ldc, bool accumulate) const {
    if (!packed()) {
      if (team.id == 0) product(M, A, lda, C, ldc, accumulate);
      return;
    }
    TORCH_INTERNAL_ASSERT(panels_.bf16());
    for_team_panels(team, C, [&](int64_t g, int64_t jb, float* c) {
      panel_product(M, A, lda, panels_, g, jb, c, ldc, accumulate);
    });
  }

 private:
  int64_t panel_count() const { return N_ / panels_.group * panels_.per_group; }

  // f(g, jb, c) for this thread's share of the panels (panel jb of group g, whose columns
  // start at c in C).
  template <class U, class F>
  void for_team_panels(const Team& team, U* C, const F& f) const {
    const int64_t per_group = panels_.per_group, panels = panel_count();
    for (int64_t i = team.begin(panels); i < team.end(panels); ++i) {
      const int64_t g = i / per_group, jb = i % per_group;
      f(g, jb, C + g * panels_.group + jb * Panels::kPanel);
    }
  }

  bool diagonal_;
  const T* w_ = nullptr;
  at::Tensor half_;       // a half-type weight read as stored
  at::Tensor converted_;  // a half-type weight's copy in T
  int64_t ld_;
  bool transpose_;
  int64_t K_, N_;
  Panels panels_;
};

}  // namespace rnn_fused::cpu
