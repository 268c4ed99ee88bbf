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

// likelihood.cpp: image terms (rows [B, d], log_scale a [d] accumulation-type vector or None)
// and code terms (rows [B, D]; kind as ehm::CodeKind; base a [B] accumulation-type vector or None).
at::Tensor image_nll_fwd(const at::Tensor& x, const at::Tensor& mean, const std::optional<at::Tensor>& log_scale,
                         int64_t kind);
std::vector<at::Tensor> image_nll_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                      const std::optional<at::Tensor>& log_scale, int64_t kind, bool need_x,
                                      bool need_mean, bool need_scale);
at::Tensor code_nll_fwd(const at::Tensor& a, const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& c,
                        const std::optional<at::Tensor>& e, const std::optional<at::Tensor>& base, int64_t kind);
std::vector<at::Tensor> code_nll_bwd(const at::Tensor& grad, const at::Tensor& a, const std::optional<at::Tensor>& b,
                                     const std::optional<at::Tensor>& c, const std::optional<at::Tensor>& e,
                                     int64_t kind, bool need_a, bool need_b, bool need_c, bool need_e);

// vamp.cpp: z [B, D], mu_k and logvar_k [K, D]; returns (out [B], lse [B]) and (gz, gmu_k, glogvar_k).
std::vector<at::Tensor> vamp_fwd(const at::Tensor& z, const at::Tensor& mu_k, const at::Tensor& logvar_k,
                                 const std::optional<at::Tensor>& base);
std::vector<at::Tensor> vamp_bwd(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& mu_k,
                                 const at::Tensor& logvar_k, const at::Tensor& lse, bool need_z, bool need_mu,
                                 bool need_logvar);

// optim.cpp: in-place control-variate Adam/AdamW and SGD over one bucket (one device, one dtype).
// An empty ref_grads/anchors pair means the plain gradient; empty directions: v is not written.
void cv_adam_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
              const std::vector<at::Tensor>& ref_grads, const std::vector<at::Tensor>& anchors,
              const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
              const std::vector<at::Tensor>& directions, double alpha, int64_t step, double lr, double beta1,
              double beta2, double eps, double weight_decay, bool decoupled, const std::vector<at::Tensor>& steps,
              const std::optional<at::Tensor>& found_inf);
void cv_sgd_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
             const std::vector<at::Tensor>& ref_grads, const std::vector<at::Tensor>& anchors,
             const std::vector<at::Tensor>& momentum_buffers, const std::vector<at::Tensor>& directions, double alpha,
             double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool first,
             const std::optional<at::Tensor>& found_inf);

}  // namespace ehm
