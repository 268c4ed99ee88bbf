// Raw-pointer kernels of the per-sample likelihood terms (no torch headers).
//
// Image terms: x and m are row-major [B, d] in `dtype`; s is log_scale expanded to one image, a [d]
// vector in the accumulation type (double for Float64, float otherwise), null for Bernoulli.
// Code terms: operands a, b, c, e are row-major [B, D] in `dtype` (those a kind does not read are
// null, see CodeKind); `base` is a [B] accumulation-type vector added to each row's sum (or null).
// `grad` is always [B] in the accumulation type; a gradient pointer that is null is not computed.
#pragma once
#include "common.h"
#include "terms.h"

namespace ehm {
namespace cpu {
// out: [B] accumulation type.
void image_nll_fwd(DType dtype, ImageKind kind, const void* x, const void* m, const void* s, int64_t B, int64_t d,
                   void* out);
// gx, gm: [B, d] dtype; gs: [d] accumulation type (column sums over the batch).
void image_nll_bwd(DType dtype, ImageKind kind, const void* grad, const void* x, const void* m, const void* s,
                   int64_t B, int64_t d, void* gx, void* gm, void* gs);
// out: [B] dtype.
void code_nll_fwd(DType dtype, CodeKind kind, const void* a, const void* b, const void* c, const void* e,
                  const void* base, int64_t B, int64_t D, void* out);
void code_nll_bwd(DType dtype, CodeKind kind, const void* grad, const void* a, const void* b, const void* c,
                  const void* e, int64_t B, int64_t D, void* ga, void* gb, void* gc, void* ge);
}  // namespace cpu

namespace cuda {
// Forward: row r is split over image_splits(B, d) blocks; block (r, k) writes its partial sum to
// partial[r * splits + k] (accumulation type); the entry adds the partials.
int64_t image_splits(int64_t B, int64_t d);
void image_nll_fwd(DType dtype, ImageKind kind, const void* x, const void* m, const void* s, int64_t B, int64_t d,
                   void* partial, void* stream);
// Backward: blocks own (a column block, a chunk of image_rows_per_chunk(B, d) rows); the log_scale
// gradient's column sums of chunk j go to gs_partial[j * d + col] (the entry adds the chunks).
int64_t image_rows_per_chunk(int64_t B, int64_t d);
void image_nll_bwd(DType dtype, ImageKind kind, const void* grad, const void* x, const void* m, const void* s,
                   int64_t B, int64_t d, void* gx, void* gm, void* gs_partial, void* stream);
void code_nll_fwd(DType dtype, CodeKind kind, const void* a, const void* b, const void* c, const void* e,
                  const void* base, int64_t B, int64_t D, void* out, void* stream);
void code_nll_bwd(DType dtype, CodeKind kind, const void* grad, const void* a, const void* b, const void* c,
                  const void* e, int64_t B, int64_t D, void* ga, void* gb, void* gc, void* ge, void* stream);
}  // namespace cuda
}  // namespace ehm
