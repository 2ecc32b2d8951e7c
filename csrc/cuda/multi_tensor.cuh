// Chunked pointer tables for multi-tensor kernels, in the spirit of apex's
// multi_tensor_apply: the tables travel as a kernel argument (no host-to-device
// copy; kernel arguments may hold up to 32 KB from sm_70 with CUDA 12.1+); each
// block processes one chunk of kChunk elements of one tensor. A launch covers up
// to kMaxTensors tensors and kMaxBlocks chunks; longer lists take a few launches.
// The lists are checked once, by the op's check_*_args (csrc/multi_tensor.h).
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <map>
#include <optional>
#include <vector>

#include "modalimmune_constants.h"
#include "multi_tensor.h"

namespace modalimmune {

constexpr int kMaxTensors = 110;
constexpr int kMaxBlocks = 2048;

template <int kDepth>
struct TensorTable {
  void* addresses[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};

// lists[k][t]: tensor t of argument k, from the op's (checked) tensor lists; an absent
// optional list gives undefined tensors (null addresses in the tables).
inline std::vector<std::vector<at::Tensor>> gather_lists(const std::vector<std::optional<at::TensorList>>& args) {
  const size_t count = args.front()->size();
  std::vector<std::vector<at::Tensor>> lists(args.size(), std::vector<at::Tensor>(count));
  for (size_t k = 0; k < args.size(); ++k)
    if (args[k].has_value()) std::copy(args[k]->begin(), args[k]->end(), lists[k].begin());
  return lists;
}

// Calls launch(table, blocks) for successive tables covering every chunk of
// every tensor. lists[k][t] is tensor t of list k; all lists have equal length
// and lists[k][t].numel() == lists[0][t].numel(). A null tensor slot
// (undefined Tensor) gives a null address.
template <int kDepth, typename Launch>
void multi_tensor_apply(const std::vector<std::vector<at::Tensor>>& lists, Launch&& launch) {
  TensorTable<kDepth> table;
  int tensors = 0, blocks = 0;
  const size_t count = lists[0].size();
  for (size_t t = 0; t < count; ++t) {
    const int64_t n = lists[0][t].numel();
    if (n == 0) continue;
    for (int k = 0; k < kDepth; ++k)
      table.addresses[k][tensors] = lists[k][t].defined() ? lists[k][t].data_ptr() : nullptr;
    table.numel[tensors] = n;
    ++tensors;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      table.block_tensor[blocks] = static_cast<unsigned char>(tensors - 1);
      table.block_chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      const bool tensors_full = tensors == kMaxTensors && last_chunk;
      const bool blocks_full = blocks == kMaxBlocks;
      if (!tensors_full && !blocks_full) continue;
      launch(table, blocks);
      blocks = 0;
      if (last_chunk) {
        tensors = 0;
      } else {  // the current tensor carries over into the next table
        for (int k = 0; k < kDepth; ++k) table.addresses[k][0] = table.addresses[k][tensors - 1];
        table.numel[0] = table.numel[tensors - 1];
        tensors = 1;
      }
    }
  }
  if (blocks > 0) launch(table, blocks);
}

// The tensors of `lists` (equal-length lists) split by the dtype of lists[0][t]:
// a kernel is compiled for one dtype, so each group gets its own launches.
inline std::map<at::ScalarType, std::vector<std::vector<at::Tensor>>> group_by_dtype(
    const std::vector<std::vector<at::Tensor>>& lists) {
  std::map<at::ScalarType, std::vector<std::vector<at::Tensor>>> groups;
  for (size_t t = 0; t < lists[0].size(); ++t) {
    auto& group = groups[lists[0][t].scalar_type()];
    if (group.empty()) group.resize(lists.size());
    for (size_t k = 0; k < lists.size(); ++k) group[k].push_back(lists[k][t]);
  }
  return groups;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

}  // namespace modalimmune
