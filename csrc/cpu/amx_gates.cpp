// AMX tile products written out with the compiler's tile intrinsics, compiled for AMX function
// by function and run only where Panels::tiles says the CPU has it.
#include "amx_gates.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "bf16_dot.h"
#include "register_transposes.h"

namespace rnn_fused::cpu {
namespace {

// Linux gives a process the tiles' state only once it asks (arch_prctl's
// ARCH_REQ_XCOMP_PERM for XTILEDATA); oneDNN asks too, but not before its first tile kernel.
bool tiles_permitted() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kRequestPermission = 0x1023, kTileData = 18;
  static const bool ok = syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  return ok;
#else
  return false;
#endif
}

}  // namespace

bool amx_gate_products_fit(const Panels& W) {
  return W.bf16() && W.tiles && W.K % 32 == 0 && tiles_permitted();
}

#if defined(__x86_64__) && defined(__GNUC__)
namespace {

#define RF_AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))

// Palette 1: eight tiles of up to 16 rows by 64 bytes (16 float32 sums, or 16 pairs of
// bfloat16), each set to its rows.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace

namespace {

// Tiles 0-3: the sums of up to 32 rows by 32 columns (2 x 2 tiles: rows 0-15 in 0-1, the rest
// in 2-3); 4-5: A's rows in the same two parts, 32 values of k each; 6-7: the panel's 16 pairs
// of rows for two blocks of 16 columns.
RF_AMX_TARGET void configure_tiles(int64_t rows) {
  const int64_t first = std::min<int64_t>(rows, 16), second = rows - first;
  TileConfig config;
  for (int t : {0, 1, 4}) config.rows[t] = static_cast<uint8_t>(first);
  for (int t : {2, 3, 5}) config.rows[t] = static_cast<uint8_t>(second);
  config.rows[6] = config.rows[7] = 16;
  for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = config.rows[t] > 0 ? 64 : 0;
  // GCC does not see that ldtilecfg reads the configuration: with this function inlined
  // elsewhere it dropped the stores above as dead (tiles of 16 rows and no bytes, a
  // general-protection fault). The barrier keeps them.
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

// rows_times_w's: all eight tiles of 16 rows by 64 bytes. 0-3: the sums of 2 x 2 blocks of 16
// columns of C (rows of W) by 16 rows of A; 4-5: W's rows of the two column blocks, 32 values
// of k each; 6-7: A's pairs for the two row blocks.
RF_AMX_TARGET void configure_square_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.bytes_per_row[t] = 64;
  }
  asm volatile("" : : "r"(&config) : "memory");  // see configure_tiles
  _tile_loadconfig(&config);
}

RF_AMX_TARGET void release_tiles() { _tile_release(); }

}  // namespace

void AmxGateTiles::release() {
  if (configured_rows_ == 0) return;
  release_tiles();
  configured_rows_ = 0;
}

RF_AMX_TARGET void AmxGateTiles::products(int64_t rows, const at::BFloat16* A, int64_t lda,
                                          const Panels& W, int64_t gates, int64_t j, float* out) {
  TORCH_INTERNAL_ASSERT(rows > 0 && rows <= kAmxGateRows);
  if (W.as_stored) {
    take_rows(rows, W.K, A, lda);
    const int64_t width = std::min(kAmxGateUnits, W.group - j * kAmxGateUnits);
    for (int64_t g = 0; g < gates; ++g)
      rows_times_w(W.panel<at::BFloat16>(g, j), W.K, width, out + g * kAmxGateUnits,
                   gates * kAmxGateUnits);
    return;
  }
  if (rows != configured_rows_) {
    // ATen's brgemm keeps its tile configuration per thread: released first, so that its next
    // call configures the tiles again.
    if (configured_rows_ == 0) bf16_tiles_take();
    configure_tiles(rows);
    configured_rows_ = rows;
  }
  const bool second = rows > 16;
  const auto* a = reinterpret_cast<const char*>(A);
  const int64_t a_stride = lda * 2, out_stride = gates * kAmxGateUnits * 4;
  // A panel's row of pairs: kAmxGateUnits columns of two bfloat16 values.
  constexpr int64_t kPairRow = kAmxGateUnits * 4;
  for (int64_t g = 0; g < gates; ++g) {
    const auto* panel = reinterpret_cast<const char*>(W.panel<at::BFloat16>(g, j));
    for (int64_t half = 0; half < 2; ++half) {
      _tile_zero(0);
      _tile_zero(1);
      if (second) {
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t k = 0; k < W.K; k += 32) {
        const char* b = panel + k / 2 * kPairRow + half * 128;
        _tile_loadd(4, a + k * 2, a_stride);
        _tile_loadd(6, b, kPairRow);
        _tile_loadd(7, b + 64, kPairRow);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (second) {
          _tile_loadd(5, a + 16 * a_stride + k * 2, a_stride);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      char* o = reinterpret_cast<char*>(out + g * kAmxGateUnits + half * 32);
      _tile_stored(0, o, out_stride);
      _tile_stored(1, o + 64, out_stride);
      if (second) {
        _tile_stored(2, o + 16 * out_stride, out_stride);
        _tile_stored(3, o + 16 * out_stride + 64, out_stride);
      }
    }
  }
}
#else
void AmxGateTiles::release() {}
void AmxGateTiles::products(int64_t, const at::BFloat16*, int64_t, const Panels&, int64_t, int64_t,
                            float*) {
  TORCH_INTERNAL_ASSERT(false, "AMX tile products without an x86-64 GCC or Clang build");
}
#endif

// W read as stored (rows_times_w) needs AVX-512 for its transposes as well.
#if defined(__x86_64__) && defined(__GNUC__) && defined(CPU_CAPABILITY_AVX512)
bool amx_stored_rows_usable() {
  const char* env = std::getenv("RNN_FUSED_STORED_TILES");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  return bf16_tiles_allowed() && tiles_permitted();
}

void AmxGateTiles::take_rows(int64_t rows, int64_t K, const at::BFloat16* A, int64_t lda) {
  TORCH_INTERNAL_ASSERT(rows > 0 && rows <= kAmxGateRows && K % 32 == 0 && lda % 2 == 0);
  const int64_t pairs = K / 2;
  if (static_cast<int64_t>(pairs_.size()) < pairs * kAmxGateRows)
    pairs_.resize(pairs * kAmxGateRows);
  // A's rows as 32-bit words (a pair of values each), 16 x 16 blocks of them transposed.
  const auto* words = reinterpret_cast<const float*>(A);
  auto* to = reinterpret_cast<float*>(pairs_.data());
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, rows - r0));
    for (int64_t p0 = 0; p0 < pairs; p0 += 16)
      transpose_block(words + r0 * (lda / 2) + p0, lda / 2, n, 16, to + p0 * kAmxGateRows + r0,
                      kAmxGateRows);
  }
  taken_rows_ = rows;
  taken_k_ = K;
}

RF_AMX_TARGET void AmxGateTiles::rows_times_w(const at::BFloat16* W, int64_t ldw, int64_t width,
                                              float* C, int64_t ldc) {
  const int64_t rows = taken_rows_, K = taken_k_;
  TORCH_INTERNAL_ASSERT(rows > 0 && width > 0 && width <= kAmxGateUnits && width % 16 == 0);
  if (configured_rows_ != kSquare) {
    if (configured_rows_ == 0) bf16_tiles_take();
    configure_square_tiles();
    configured_rows_ = kSquare;
  }
  const bool second = rows > 16;
  const auto* w = reinterpret_cast<const char*>(W);
  const auto* pairs = reinterpret_cast<const char*>(pairs_.data());
  const int64_t w_stride = ldw * 2;
  constexpr int64_t kPairRow = kAmxGateRows * 4;  // one pair of values of 32 rows of A
  alignas(64) float sums[4][16 * 16];             // [column of C][row of A] per tile
  for (int64_t c0 = 0; c0 < width; c0 += 32) {
    const bool two = c0 + 16 < width;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < K; k += 32) {
      const char* p = pairs + k / 2 * kPairRow;
      _tile_loadd(6, p, kPairRow);
      _tile_loadd(4, w + c0 * w_stride + k * 2, w_stride);
      _tile_dpbf16ps(0, 4, 6);
      if (second) {
        _tile_loadd(7, p + 64, kPairRow);
        _tile_dpbf16ps(1, 4, 7);
      }
      if (two) {
        _tile_loadd(5, w + (c0 + 16) * w_stride + k * 2, w_stride);
        _tile_dpbf16ps(2, 5, 6);
        if (second) _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, sums[0], 64);
    _tile_stored(1, sums[1], 64);
    _tile_stored(2, sums[2], 64);
    _tile_stored(3, sums[3], 64);
    for (int t = 0; t < 4; ++t) {
      const int64_t r0 = t % 2 * 16, c = c0 + t / 2 * 16;
      if (r0 < rows && c < width)
        transpose_block(sums[t], 16, 16, static_cast<int>(std::min<int64_t>(16, rows - r0)),
                        C + r0 * ldc + c, ldc);
    }
  }
}
#else
bool amx_stored_rows_usable() { return false; }
void AmxGateTiles::take_rows(int64_t, int64_t, const at::BFloat16*, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "W read as stored on the tiles needs an x86-64 AVX-512 build");
}
void AmxGateTiles::rows_times_w(const at::BFloat16*, int64_t, int64_t, float*, int64_t) {}
#endif

}  // namespace rnn_fused::cpu
