// AMX tile products written out with the compiler's tile intrinsics, compiled for AMX function
// by function and run only where Panels::tiles says the CPU has it.
#include "amx_gates.h"

#include <immintrin.h>

#include <algorithm>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "bf16_dot.h"

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

}  // namespace rnn_fused::cpu
