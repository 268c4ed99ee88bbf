// Raw-pointer kernels of the VampPrior: -log p(z_b) = log K - logsumexp_k log N(z_b; mu_k, exp(lv_k)).
// z is row-major [B, D], mu and lv [K, D], all in `dtype`. The [B, K, D] terms are never stored:
// the forward keeps a running (max, sum) over k and saves lse[b] (accumulation type); the backward
// recomputes log N(z_b; mu_k, .) and the responsibilities exp(log N - lse[b]) from it.
// `base` ([B], accumulation type, or null) is added to out; `grad` is [B] in the accumulation type.
#pragma once
#include "common.h"

namespace ehm {
namespace cpu {
void vamp_fwd(DType dtype, const void* z, const void* mu, const void* lv, const void* base, int64_t B, int64_t K,
              int64_t D, void* out, void* lse);
// gz [B, D], gmu and glv [K, D] in dtype; a null pointer is not computed.
void vamp_bwd(DType dtype, const void* grad, const void* z, const void* mu, const void* lv, const void* lse, int64_t B,
              int64_t K, int64_t D, void* gz, void* gmu, void* glv);
}  // namespace cpu

namespace cuda {
// The largest code size D whose per-block buffers fit the current device's shared memory.
int64_t vamp_max_code_size(DType dtype);
// The batch is cut into chunks of vamp_rows_per_chunk(B, K) codes for the mu/lv gradients; chunk j
// writes its sums to gmu_partial / glv_partial [j, K, D] (accumulation type), the entry adds them.
int64_t vamp_rows_per_chunk(int64_t B, int64_t K);
void vamp_fwd(DType dtype, const void* z, const void* mu, const void* lv, const void* base, int64_t B, int64_t K,
              int64_t D, void* out, void* lse, void* stream);
void vamp_bwd(DType dtype, const void* grad, const void* z, const void* mu, const void* lv, const void* lse, int64_t B,
              int64_t K, int64_t D, void* gz, void* gmu_partial, void* glv_partial, void* stream);
}  // namespace cuda
}  // namespace ehm
