// Packing of the products' right-hand sides into column panels (Panels, panels.h), and the
// transposed copies the products read: one pass over each weight per call.
// GCC 12 takes the operand that the transposes' AVX-512 intrinsics leave undefined for an
// uninitialised variable once they are inlined (see gemm.cpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "gemm.h"
#include "register_transposes.h"
#include "workspace.h"

namespace rnn_fused::cpu {
namespace {

// Panels of more bytes than this (a core's L2 on the Intel kind) are read by streamed_panel,
// with the next panel fetched along the way; smaller ones stay in L2 from step to step,
// where brgemm reads them faster. Float32 forward, streamed against brgemm (Intel Xeon with
// AMX): LSTM T=200 B=16 H=128 0.955, T=50 B=32 H=256 1.00, T=100 B=64 H=512 1.05-1.15.
constexpr int64_t kStreamedPanelsBytes = int64_t(2) << 20;

// Whether float32 panels of `bytes` are read by streamed_panel (Panels::streamed, set once
// when they are packed): on Intel CPUs, where it was measured (not on the AMD kind, whose L2
// is half the size); RNN_FUSED_STREAMED_PANELS=0 or =1 turns it off or on (the tests run
// both).
bool streamed_panels(int64_t bytes) {
#if defined(CPU_CAPABILITY_AVX512)
  if (bytes <= kStreamedPanelsBytes) return false;
  const char* env = std::getenv("RNN_FUSED_STREAMED_PANELS");
  if (env != nullptr) return std::strcmp(env, "0") != 0;
  static const bool intel = __builtin_cpu_is("intel");
  return intel;
#else
  return false;
#endif
}

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < M, j < N: whole square blocks of float32
// (16 x 16 on AVX-512) or, on AVX2, of float32 and float64 (8 x 8, 4 x 4) in registers
// (register_transposes.h), the edges and other dtypes by ATen's transpose_mxn.
template <class T>
void transpose_mxn(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t M, int64_t N) {
  int64_t Mb = 0, Nb = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    Mb = M / 16 * 16;
    Nb = N / 16 * 16;
    for (int64_t i = 0; i < Mb; i += 16)
      for (int64_t j = 0; j < Nb; j += 16)
        transpose_block(src + i * ld_src + j, ld_src, 16, 16, dst + j * ld_dst + i, ld_dst);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    constexpr int64_t kSide = 32 / sizeof(T);
    Mb = M / kSide * kSide;
    Nb = N / kSide * kSide;
    // Down the rows of src first: each row of dst is then written in whole lines. ATen's loop
    // of single values wrote dst a column at a time, a row of dst apart: a float32 LSTM's
    // transposes of its gate gradients for the weight gradients took 8.8 ms of a call at T=32
    // B=64 H=256, forward and backward, 1.4 ms this way (perf, one thread, AMD EPYC Zen 3).
    for (int64_t j = 0; j < Nb; j += kSide)
      for (int64_t i = 0; i < Mb; i += kSide)
        transpose_whole_block(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
  }
#endif
  // The edges: columns past Nb of the block rows done, then the rows past Mb.
  if (Nb < N && Mb > 0)
    at::vec::transpose_mxn<T>(src + Nb, ld_src, dst + Nb * ld_dst, ld_dst, static_cast<int>(Mb),
                              static_cast<int>(N - Nb));
  if (Mb < M)
    at::vec::transpose_mxn<T>(src + Mb * ld_src, ld_src, dst + Mb, ld_dst, static_cast<int>(M - Mb),
                              static_cast<int>(N));
}

// pack_panels of a b in its own dtype, with no at::Tensor views, pads and permuted copies set
// up per call. Rows contiguous: a row's part of a panel is one memcpy. Values contiguous
// along K (a weight seen transposed: the forward's products take W^T): a panel is a
// transpose of `width` rows of the weight, by ATen's SIMD transposes of 16 x 16 blocks;
// TensorIterator's strided copy into the panels took 13% of an LSTM's forward at T=100 B=1
// H=256 and 5% of a 2-layer bidirectional one's at T=50 B=32 H=256 (AMD EPYC).
Panels pack_dense(const at::Tensor& b, int64_t group, int64_t groups, int64_t per_group) {
  const int64_t K = b.size(0), N = b.size(1), P = Panels::kPanel;
  const bool rows = b.stride(1) == 1;
  const int64_t ld = rows ? b.stride(0) : b.stride(1);  // between rows, or between columns
  const PanelColumns columns{group, per_group};
  at::Tensor data = buffer_empty({groups, per_group, K, P}, b.options());
  AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "rnn_fused_pack_dense", [&] {
    const scalar_t* src = b.data_ptr<scalar_t>();
    scalar_t* dst = data.data_ptr<scalar_t>();
    constexpr int64_t S = panel_stripe<scalar_t>();
    split_over_threads(groups * per_group, K * P, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t panel = columns.in_unit_order(q, groups);
        const int64_t width = columns.width(panel), first = columns.first(panel);
        // Stripe by stripe (panel_stripe: all P columns in one but for float64 without AVX-512).
        for (int64_t s = 0; s < P; s += S) {
          const int64_t n = std::clamp<int64_t>(width - s, 0, S), column = first + s;
          scalar_t* to = dst + panel * K * P + s * K;
          if (rows) {
            for (int64_t k = 0; k < K; ++k)
              std::memcpy(to + k * S, src + k * ld + column, sizeof(scalar_t) * n);
          } else if (n > 0) {
            transpose_mxn<scalar_t>(src + column * ld, ld, to, S, n, K);
          }
          if (n < S)
            for (int64_t k = 0; k < K; ++k) std::fill(to + k * S + n, to + k * S + S, 0);
        }
      }
    });
  });
  return {data, K, N, group, per_group};
}

// One panel of pack_pairs from bfloat16 values contiguous along K (a bfloat16 weight seen
// transposed): the pair of rows k, k + 1 of a column is two adjacent values of b, copied as
// one 32-bit word, 16 columns at a time so that each write fills a cache line. `to` holds
// zeros where no value lands. Converting value by value took 3% of a bf16 LSTM's forward at
// T=100 B=64 H=512 (perf); this made the forward 2-3% faster (AMD EPYC). Where b's columns
// start on whole words (sn even) the words are a matrix transposed by ATen's SIMD transposes
// of 16 x 16 blocks, which move the bits as they are: the packing's share of an LSTM's bf16
// forward at T=100 B=1 H=256 went from 11.7% to 7.3% of perf's samples (Intel Xeon).
void copy_pairs(int64_t K, const at::BFloat16* from, int64_t sn, int64_t width, at::BFloat16* to) {
  constexpr int64_t P = Panels::kPanel, kColumns = 16;
  const int64_t pairs = K / 2;
  auto* const words = reinterpret_cast<uint32_t*>(to);
  if (sn % 2 == 0) {
    static_assert(sizeof(float) == 2 * sizeof(at::BFloat16));
    transpose_mxn<float>(reinterpret_cast<const float*>(from), sn / 2, reinterpret_cast<float*>(to),
                         P, width, pairs);
  } else {
    for (int64_t c0 = 0; c0 < width; c0 += kColumns) {
      const int64_t c1 = std::min(width, c0 + kColumns);
      for (int64_t p = 0; p < pairs; ++p) {
        for (int64_t c = c0; c < c1; ++c) std::memcpy(words + p * P + c, from + c * sn + 2 * p, 4);
      }
    }
  }
  // An odd K's last row: the first of a pair whose second stays zero.
  if (K % 2 != 0)
    for (int64_t c = 0; c < width; ++c) to[(pairs * P + c) * 2] = from[c * sn + K - 1];
}

// pack_panels into bfloat16 pairs of rows, from any floating dtype and strides: each value
// read once and rounded (to nearest even) where it lands. A permuted copy through at::Tensor
// views walked the pairs element by element and took a quarter of a bf16 LSTM call at batch
// 1 (T=100 H=256, AMD EPYC).
Panels pack_pairs(const at::Tensor& b, int64_t group, int64_t groups, int64_t per_group) {
  const int64_t K = b.size(0), N = b.size(1), P = Panels::kPanel, pairs = (K + 1) / 2;
  const int64_t sk = b.stride(0), sn = b.stride(1);
  at::Tensor data =
      buffer_empty({groups, per_group, pairs, P, 2}, b.options().dtype(at::kBFloat16));
  at::BFloat16* dst = data.data_ptr<at::BFloat16>();
  const PanelColumns columns{group, per_group};
  // fill(offset, width, to) writes a panel of `width` columns from b's values at `offset`.
  const auto each_panel = [&](const auto& fill) {
    split_over_threads(groups * per_group, K * P, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t panel = columns.in_unit_order(q, groups);
        const int64_t width = columns.width(panel);
        at::BFloat16* to = dst + panel * pairs * P * 2;
        // Zeros where no value lands: the columns past a group's end, an odd K's last pair.
        if (width < P || K % 2 != 0) std::fill(to, to + pairs * P * 2, at::BFloat16(0.0f));
        fill(columns.first(panel) * sn, width, to);
      }
    });
  };
  if (b.scalar_type() == at::kBFloat16 && sk == 1) {
    const at::BFloat16* src = b.data_ptr<at::BFloat16>();
    each_panel([&](int64_t offset, int64_t width, at::BFloat16* to) {
      copy_pairs(K, src + offset, sn, width, to);
    });
    return {data, K, N, group, per_group};
  }
  // Row-major b (a weight as stored, gate gradients): two rows at a time, read whole, their
  // values interleaved into one pair row of each panel.
  const auto rows_in_pairs = [&](const auto* src) {
    split_over_threads(pairs, 2 * N, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const auto* first = src + 2 * q * sk;
        const auto* second = 2 * q + 1 < K ? first + sk : nullptr;
        for (int64_t panel = 0; panel < groups * per_group; ++panel) {
          const int64_t width = columns.width(panel), column = columns.first(panel);
          at::BFloat16* to = dst + (panel * pairs + q) * P * 2;
          bf16_pair_rows(first + column, second == nullptr ? nullptr : second + column, width, to);
          std::fill(to + 2 * width, to + 2 * P, at::BFloat16(0.0f));
        }
      }
    });
    return Panels{data, K, N, group, per_group};
  };
  if (sn == 1) {
    if (b.scalar_type() == at::kFloat) return rows_in_pairs(b.data_ptr<float>());
    if (b.scalar_type() == at::kBFloat16) return rows_in_pairs(b.data_ptr<at::BFloat16>());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, b.scalar_type(), "rnn_fused_pack_pairs", [&] {
        const scalar_t* src = b.data_ptr<scalar_t>();
        each_panel([&](int64_t offset, int64_t width, at::BFloat16* to) {
          const scalar_t* from = src + offset;
          const auto put = [&](int64_t k, int64_t c) {
            to[(k / 2 * P + c) * 2 + k % 2] =
                at::BFloat16(static_cast<float>(from[k * sk + c * sn]));
          };
          // Along b's contiguous dimension: a transposed weight's columns are its rows.
          if (sk == 1) {
            for (int64_t c = 0; c < width; ++c)
              for (int64_t k = 0; k < K; ++k) put(k, c);
          } else {
            for (int64_t k = 0; k < K; ++k)
              for (int64_t c = 0; c < width; ++c) put(k, c);
          }
        });
      });
  return {data, K, N, group, per_group};
}

}  // namespace

at::Tensor transposed(const at::Tensor& m) {
  TORCH_INTERNAL_ASSERT(m.dim() == 2 && m.stride(1) == 1);
  const int64_t M = m.size(0), N = m.size(1), ld = m.stride(0);
  at::Tensor t = buffer_empty({N, M}, m.options());
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "rnn_fused_transposed", [&] {
    const scalar_t* src = m.data_ptr<scalar_t>();
    scalar_t* dst = t.data_ptr<scalar_t>();
    constexpr int64_t kRows = 64;  // of m, per task
    split_over_threads((M + kRows - 1) / kRows, kRows * N, [&](int64_t begin, int64_t end) {
      const int64_t i0 = begin * kRows, i1 = std::min(M, end * kRows);
      transpose_mxn<scalar_t>(src + i0 * ld, ld, dst + i0, M, i1 - i0, N);
    });
  });
  return t;
}

Panels pack_panels(const at::Tensor& b, int64_t group, bool bf16) {
  const int64_t K = b.size(0), N = b.size(1), P = Panels::kPanel;
  group = group > 0 ? group : N;
  if (N == 0 || group == 0) {
    return {at::empty({0}, b.options().dtype(bf16 ? at::kBFloat16 : b.scalar_type())), K, N, group,
            0};
  }
  TORCH_INTERNAL_ASSERT(N % group == 0);
  const int64_t groups = N / group, per_group = (group + P - 1) / P;
  if (bf16) {
    Panels pairs = pack_pairs(b, group, groups, per_group);
    pairs.tiles = bf16_tiles_allowed();
    return pairs;
  }
  const bool own_dtype = b.scalar_type() == at::kFloat || b.scalar_type() == at::kDouble;
  Panels panels;
  if (own_dtype && (b.stride(1) == 1 || b.stride(0) == 1)) {
    panels = pack_dense(b, group, groups, per_group);
  } else {
    at::Tensor grouped = b.reshape({K, groups, group});
    if (per_group * P != group) grouped = at::constant_pad_nd(grouped, {0, per_group * P - group});
    const int64_t S = b.scalar_type() == at::kDouble ? panel_stripe<double>() : P;
    at::Tensor data = grouped.reshape({K, groups, per_group, P / S, S}).permute({1, 2, 3, 0, 4});
    panels = {data.contiguous(), K, N, group, per_group};
  }
  panels.streamed =
      panels.data.scalar_type() == at::kFloat && streamed_panels(panels.data.nbytes());
  return panels;
}

Panels stored_rows_for_tiles(const at::Tensor& w, int64_t group) {
  const int64_t N = w.size(0), K = w.size(1);
  group = group > 0 ? group : N;
  TORCH_INTERNAL_ASSERT(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && N % group == 0 &&
                        group % 16 == 0 && K % 32 == 0);
  Panels panels{w, K, N, group, (group + Panels::kPanel - 1) / Panels::kPanel};
  panels.tiles = true;
  panels.as_stored = true;
  return panels;
}

}  // namespace rnn_fused::cpu
