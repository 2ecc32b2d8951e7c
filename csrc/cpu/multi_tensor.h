// Work split of the CPU multi-tensor ops (curvature_mask, neumann_update): every tensor in chunks
// of kChunk elements (modalimmune/ops/constants.py), one OpenMP job each; the kernels of the other
// backends split the same way.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "modalimmune_constants.h"

namespace modalimmune {

struct Chunk {
  int tensor;
  int64_t begin;
  int64_t end;
};

// The chunks of `tensors` (the first list of the op: every list has its sizes), in order.
inline std::vector<Chunk> chunks_of(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t begin = 0; begin < n; begin += kChunk)
      chunks.push_back({static_cast<int>(t), begin, std::min(n, begin + kChunk)});
  }
  return chunks;
}

}  // namespace modalimmune
