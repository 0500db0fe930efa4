// Memory the CPU engine reuses from call to call: its outputs, a training forward's
// workspace (saved, h_prev), a backward's gradients and every large buffer of a call. The C
// library (glibc) serves a block of more than 32 MiB from fresh memory of the system each
// time and unmaps it when freed, and gives the free top of its heap back to the system once it
// exceeds twice the largest block it has learned to keep; touching fresh memory costs a page
// fault per 4 KiB: a fifth of a LayerNorm LSTM's forward and backward at T=100 B=32 H=256 (a
// 41 MiB workspace). A training loop frees after each backward the sizes its next forward asks
// for; those blocks are kept and handed out again.
#pragma once

#include <ATen/ATen.h>

namespace rnn_fused::cpu {

// An uninitialised contiguous CPU tensor, from a freed block of the cache when one fits (at
// least `sizes`, at most twice as large) and it has kMinCachedBufferBytes or more; smaller
// ones from the allocator as usual. Freed, a block goes back to the cache, which holds at most
// RNN_FUSED_CPU_WORKSPACE_CACHE_MB MiB of freed blocks (default 1024; 0 turns it off), the
// oldest freed first to go. Freed together at the top of glibc's heap, such blocks were
// returned to the system, and every call faulted on each of their pages: a fifth of
// LSTMCell(256)'s forward and backward at batch 1 (weight gradients, Intel Xeon).
at::Tensor buffer_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

constexpr size_t kMinCachedBufferBytes = size_t(256) << 10;

// Frees the blocks the cache holds (a block in use is kept by its tensor until freed).
void empty_workspace_cache();

// The bytes of freed blocks the cache holds.
size_t cached_workspace_bytes();

// A new uninitialised contiguous CPU tensor, made without a trip through the dispatcher
// (at::empty's costs a short call a few tenths of a microsecond per tensor). For the
// engine's own outputs and buffers, which are plain CPU tensors whatever dispatch keys the
// call came through.
at::Tensor cpu_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// buffer_empty's tensor filled with zeros: the states a call starts from when none are given.
at::Tensor buffer_zeros(at::IntArrayRef sizes, const at::TensorOptions& options);

// Scratch memory of a short call: `bytes` (aligned to 64) from a buffer the calling thread
// keeps, when at most kThreadScratchBytes, else nullptr (the caller allocates). Valid until
// the thread's next request: for buffers that live within one call of the engine, which
// never calls itself on the same thread.
constexpr size_t kThreadScratchBytes = size_t(64) << 10;
void* thread_scratch(size_t bytes);

// Whether t is a half type (float16 or bfloat16).
inline bool half_type(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// A new contiguous copy of t in dtype (narrowing rounds to nearest even, as Tensor::to does).
// Made without the dispatcher (clone's and Tensor::to's TensorIterator cost more than a short
// call's conversions: seven in a bfloat16 LSTMCell's step, LSTMCell(32) 37.5 -> 18.1 us a
// step, Intel Xeon), and large ones in the buffer cache: from the C library, a step's states
// and conversions of a megabyte each went back to the system between calls or not, by how
// its heap happened to lie, and RNNCell(256)'s bfloat16 step at batch 1024 under no_grad took
// 0.81 ms in one process and 1.5 or 2.2 in another (AMD EPYC).
at::Tensor converted_copy(const at::Tensor& t, at::ScalarType dtype);

}  // namespace rnn_fused::cpu
