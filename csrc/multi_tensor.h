// The argument check of the multi-tensor ops (curvature_mask, neumann_update), in the spirit
// of apex's multi_tensor_apply, shared by their CPU and CUDA kernels: each op's header states
// its lists once (csrc/<op>.h), this checks them. The Python entry points check the same
// contract first, with messages per argument (modalimmune/ops/<op>.py); this is the guard of
// direct calls to torch.ops.modalimmune.*.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace modalimmune {

// One tensor-list argument: its schema name, its tensors, and the dtype each of them must
// have (nullopt: the dtype of the first list's tensor at the same index).
struct TensorListArg {
  const char* name;
  at::TensorList tensors;
  std::optional<at::ScalarType> dtype = std::nullopt;
};

// Every list has the first one's length; tensor t of every list is on `device`, contiguous,
// with as many elements as the first list's tensor t, of the dtype its TensorListArg names;
// the first list's dtypes are among `first_dtypes`.
inline void check_tensor_lists(const char* op, const std::vector<TensorListArg>& lists,
                               const std::vector<at::ScalarType>& first_dtypes, const at::Device& device) {
  const TensorListArg& first = lists.front();
  for (const TensorListArg& list : lists)
    TORCH_CHECK(list.tensors.size() == first.tensors.size(), op, ": ", list.name, ": expected ",
                first.tensors.size(), " tensors like ", first.name, ", got ", list.tensors.size());
  for (size_t t = 0; t < first.tensors.size(); ++t) {
    const at::Tensor& lead = first.tensors[t];
    TORCH_CHECK(std::find(first_dtypes.begin(), first_dtypes.end(), lead.scalar_type()) != first_dtypes.end(), op,
                ": ", first.name, "[", t, "]: unsupported dtype ", lead.scalar_type());
    for (const TensorListArg& list : lists) {
      const at::Tensor& x = list.tensors[t];
      const at::ScalarType dtype = list.dtype.value_or(lead.scalar_type());
      TORCH_CHECK(x.device() == device, op, ": ", list.name, "[", t, "]: expected a tensor on ", device,
                  ", got one on ", x.device());
      TORCH_CHECK(x.numel() == lead.numel(), op, ": ", list.name, "[", t, "]: expected ", lead.numel(),
                  " elements like ", first.name, "[", t, "], got ", x.numel());
      TORCH_CHECK(x.scalar_type() == dtype, op, ": ", list.name, "[", t, "]: expected ", dtype, ", got ",
                  x.scalar_type());
      TORCH_CHECK(x.is_contiguous(), op, ": ", list.name, "[", t, "]: expected a contiguous tensor");
    }
  }
}

}  // namespace modalimmune
