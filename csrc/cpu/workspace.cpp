#include "workspace.h"

#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>

namespace rnn_fused::cpu {
namespace {

struct Block {
  void* data;
  size_t bytes;
};

// Freed blocks, oldest first. Never destroyed: a tensor may free its block after static
// destructors have run.
struct Cache {
  std::mutex mutex;
  std::deque<Block> blocks;
  size_t bytes = 0;
};

Cache& cache() {
  static Cache* const c = new Cache();
  return *c;
}

size_t cache_limit() {
  static const size_t limit = [] {
    const char* env = std::getenv("RNN_FUSED_CPU_WORKSPACE_CACHE_MB");
    if (env == nullptr) return size_t(1024) << 20;
    char* end = nullptr;
    const unsigned long long mib = std::strtoull(env, &end, 10);
    TORCH_CHECK(*env != '\0' && *end == '\0',
                "rnn_fused: RNN_FUSED_CPU_WORKSPACE_CACHE_MB must be a number of MiB, got '", env,
                "'");
    return size_t(mib) << 20;
  }();
  return limit;
}

constexpr size_t kAlignment = 4096;

// Takes a freed block of at least `bytes` and at most twice that (the smallest such), or
// returns a null block.
Block take(size_t bytes) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  auto best = c.blocks.end();
  for (auto it = c.blocks.begin(); it != c.blocks.end(); ++it) {
    if (it->bytes >= bytes && it->bytes <= 2 * bytes &&
        (best == c.blocks.end() || it->bytes < best->bytes)) {
      best = it;
    }
  }
  if (best == c.blocks.end()) return Block{nullptr, 0};
  const Block b = *best;
  c.blocks.erase(best);
  c.bytes -= b.bytes;
  return b;
}

void give_back(Block b) {
  Cache& c = cache();
  std::deque<Block> evicted;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    if (b.bytes <= cache_limit()) {
      c.blocks.push_back(b);
      c.bytes += b.bytes;
    } else {
      evicted.push_back(b);
    }
    while (c.bytes > cache_limit()) {
      evicted.push_back(c.blocks.front());
      c.bytes -= c.blocks.front().bytes;
      c.blocks.pop_front();
    }
  }
  for (const Block& e : evicted) std::free(e.data);
}

// The cache as an allocator: its tensors' storages are resizable like at::empty's, and a
// resized one's old block goes back to the cache.
struct CacheAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t bytes) override {
    Block b = take(bytes);
    if (b.data == nullptr) {
      b.bytes = (std::max<size_t>(bytes, 1) + kAlignment - 1) / kAlignment * kAlignment;
      b.data = std::aligned_alloc(kAlignment, b.bytes);
      TORCH_CHECK(b.data != nullptr, "rnn_fused: out of memory allocating ", b.bytes, " bytes");
    }
    return {b.data, new Block(b), &release, c10::Device(c10::kCPU)};
  }
  static void release(void* owner) {
    const std::unique_ptr<Block> b(static_cast<Block*>(owner));
    give_back(*b);
  }
  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

at::Tensor cpu_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_cpu(sizes, options);
}

void* thread_scratch(size_t bytes) {
  if (bytes > kThreadScratchBytes) return nullptr;
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<void, Free> buffer(std::aligned_alloc(64, kThreadScratchBytes));
  TORCH_CHECK(buffer != nullptr, "rnn_fused: out of memory allocating a thread's scratch");
  return buffer.get();
}

at::Tensor buffer_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kMinCachedBufferBytes || cache_limit() == 0) return cpu_empty(sizes, options);
  static CacheAllocator* const allocator = new CacheAllocator();  // outlives every tensor
  return at::detail::empty_generic(sizes, allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

at::Tensor buffer_zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = buffer_empty(sizes, options);
  if (t.nbytes() > 0) std::memset(t.data_ptr(), 0, t.nbytes());
  return t;
}

void empty_workspace_cache() {
  Cache& c = cache();
  std::deque<Block> freed;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    freed.swap(c.blocks);
    c.bytes = 0;
  }
  for (const Block& b : freed) std::free(b.data);
}

size_t cached_workspace_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.bytes;
}

namespace {

// Values from which a conversion runs over all threads.
constexpr int64_t kParallelConversionValues = int64_t(1) << 16;

// Whether converted_copy converts t itself: a contiguous CPU tensor, float32 to or from a half
// type, or to its own dtype.
bool own_conversion(const at::Tensor& t, at::ScalarType dtype) {
  const at::ScalarType from = t.scalar_type();
  const bool pair = from == dtype || (from == at::kFloat && half_type(dtype)) ||
                    (half_type(from) && dtype == at::kFloat);
  return pair && t.is_contiguous() && t.is_cpu();
}

}  // namespace

at::Tensor converted_copy(const at::Tensor& t, at::ScalarType dtype) {
  if (!own_conversion(t, dtype)) return t.to(dtype, /*non_blocking=*/false, /*copy=*/true);
  at::Tensor out = buffer_empty(t.sizes(), t.options().dtype(dtype));
  const int64_t n = t.numel();
  const at::ScalarType from = t.scalar_type();
  if (from == dtype) {
    if (n > 0) std::memcpy(out.data_ptr(), t.data_ptr(), t.nbytes());
    return out;
  }
  AT_DISPATCH_REDUCED_FLOATING_TYPES(from == at::kFloat ? dtype : from, "rnn_fused_converted", [&] {
    const auto values = [&](int64_t begin, int64_t end) {
      if (from == at::kFloat) {
        at::vec::convert(t.data_ptr<float>() + begin, out.data_ptr<scalar_t>() + begin,
                         end - begin);
      } else {
        at::vec::convert(t.data_ptr<scalar_t>() + begin, out.data_ptr<float>() + begin,
                         end - begin);
      }
    };
    if (n < kParallelConversionValues) return values(0, n);
    at::parallel_for(0, n, kParallelConversionValues / 2, values);
  });
  return out;
}

}  // namespace rnn_fused::cpu
