// Raw-pointer kernels of the log-partition op family (rows of M log-weights, row-major [R, M]).
// `grad` and `lse` are in the accumulation type (double for Float64, float otherwise); inputs
// and gradients in `dtype`. `p` may be null (log_proposal = 0); `gs`/`gp` may be null (not needed).
#pragma once
#include "common.h"

namespace ehm {
namespace cpu {
void log_partition_fwd(DType dtype, const void* s, const void* p, int64_t R, int64_t M, bool jensen, void* out,
                       void* lse);
void log_partition_bwd(DType dtype, const void* grad, const void* s, const void* p, const void* lse, int64_t R,
                       int64_t M, bool jensen, void* gs, void* gp);
}  // namespace cpu

namespace cuda {
// `stream` is a cudaStream_t; `workspace` holds 2 * R * splits accumulators (see log_partition_splits).
int64_t log_partition_splits(int64_t R, int64_t M);
void log_partition_fwd(DType dtype, const void* s, const void* p, int64_t R, int64_t M, bool jensen, void* out,
                       void* lse, void* workspace, void* stream);
void log_partition_bwd(DType dtype, const void* grad, const void* s, const void* p, const void* lse, int64_t R,
                       int64_t M, bool jensen, void* gs, void* gp, void* stream);
}  // namespace cuda
}  // namespace ehm
