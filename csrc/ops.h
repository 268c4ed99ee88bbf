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

// optim.cpp: in-place control-variate Adam/AdamW and SGD over one bucket (one device, one dtype).
// An empty ref_grads/anchors pair means the plain gradient; empty directions: v is not written.
void cv_adam_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
              const std::vector<at::Tensor>& ref_grads, const std::vector<at::Tensor>& anchors,
              const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
              const std::vector<at::Tensor>& directions, double alpha, int64_t step, double lr, double beta1,
              double beta2, double eps, double weight_decay, bool decoupled);
void cv_sgd_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
             const std::vector<at::Tensor>& ref_grads, const std::vector<at::Tensor>& anchors,
             const std::vector<at::Tensor>& momentum_buffers, const std::vector<at::Tensor>& directions, double alpha,
             double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool first);

}  // namespace ehm
