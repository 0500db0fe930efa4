// Compiles the cell math of cell_math.h for the device, so that a build on a machine with
// a CUDA toolkit (with or without a GPU) proves it. Registers no operator.
#include <ATen/cuda/CUDAContext.h>

#include "../cell_math.h"

namespace rnn_fused::cuda {
namespace {

template <class Cell>
__global__ void cell_roundtrip(const float* x, const float* hh, float* out) {
  float saved[Cell::kSaved], dx[Cell::kGates], dhh[Cell::kGates];
  float h = 0.f, c = 0.f, dh_prev = 0.f, dc_prev = 0.f;
  Cell::forward(x, hh, x[0], hh[0], h, c, saved);
  Cell::backward(h, c, saved, x[0], dx, dhh, dh_prev, dc_prev);
  out[threadIdx.x] = h + c + dx[0] + dhh[0] + dh_prev + dc_prev;
}

template __global__ void cell_roundtrip<LstmCell<float>>(const float*, const float*, float*);
template __global__ void cell_roundtrip<GruCell<float>>(const float*, const float*, float*);
template __global__ void cell_roundtrip<RnnTanhCell<float>>(const float*, const float*, float*);
template __global__ void cell_roundtrip<RnnReluCell<float>>(const float*, const float*, float*);

}  // namespace
}  // namespace rnn_fused::cuda
