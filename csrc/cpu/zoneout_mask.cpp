// Zoneout's training masks on the CPU, drawn from a counter-based generator: element i of
// a mask is 1 where u_i < p, u_i = (SplitMix64's i-th output from `seed`) >> 11, times 2^-53.
// Each element depends on (seed, i) only, so the draw splits over threads, vectorises, and
// gives the same bits on any number of threads. torch's CPU generator (mt19937, one element
// at a time) took 5.9 ms for the 819200 elements of a T=100 B=32 H=256 layer's mask, a third
// of that layer's forward (Intel Xeon, 2 threads); the seed comes from torch's generator
// (rnn_fused/ops.py), so torch.manual_seed still makes a run repeatable.
// rnn_fused/reference.py has the same generator in numpy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

namespace rnn_fused::cpu {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;  // SplitMix64's increment

// SplitMix64's output for the state seed + (i + 1) * kGolden.
inline uint64_t splitmix64(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * kGolden;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <class T>
void fill_mask(T* out, int64_t begin, int64_t end, uint64_t seed, double p) {
  for (int64_t i = begin; i < end; ++i) {
    const double u =
        static_cast<double>(splitmix64(seed, static_cast<uint64_t>(i)) >> 11) * 0x1p-53;
    out[i] = u < p ? T(1) : T(0);
  }
}

at::Tensor zoneout_mask(const at::Tensor& seed, c10::IntArrayRef size, double p,
                        at::ScalarType dtype) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "rnn_fused: seed must be a one-element int64 CPU tensor, got ", seed.numel(),
              " elements of ", seed.scalar_type(), " on ", seed.device());
  TORCH_CHECK(p >= 0 && p <= 1, "rnn_fused: p must be in [0, 1], got ", p);
  at::Tensor mask = at::empty(size, at::TensorOptions().dtype(dtype));
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rnn_fused_zoneout_mask", [&] {
    scalar_t* out = mask.data_ptr<scalar_t>();
    at::parallel_for(0, mask.numel(), 32768,
                     [&](int64_t begin, int64_t end) { fill_mask(out, begin, end, s, p); });
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_fused, CPU, m) { m.impl("zoneout_mask", &zoneout_mask); }

}  // namespace rnn_fused::cpu
