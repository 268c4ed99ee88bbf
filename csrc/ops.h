// Tensor-level entry points of every op family, bound to Python in bindings.cpp.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace ehm {

// log_partition.cpp
std::vector<at::Tensor> log_partition_fwd(const at::Tensor& scores, const std::optional<at::Tensor>& log_proposal,
                                          bool jensen);
std::vector<at::Tensor> log_partition_bwd(const at::Tensor& grad, const at::Tensor& scores,
                                          const std::optional<at::Tensor>& log_proposal, const at::Tensor& lse,
                                          bool jensen, bool need_scores, bool need_proposal);

}  // namespace ehm
