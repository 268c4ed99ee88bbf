// CUDA kernels of the control-variate optimizer updates, multi-tensor: the addresses and sizes of
// up to kMaxTensors tensors and a block -> (tensor, chunk) map travel by value in the kernel's
// argument block (as apex's / PyTorch's MultiTensorApply do); a bucket with more tensors or
// chunks than fit is launched several times. Square roots and divisions are IEEE-rounded
// (__fsqrt_rn, __fdiv_rn) whatever --use_fast_math says, to stay at torch.optim's rounding.
// Step counts and found_inf are read on the device (optim.h), so a launch needs nothing from the
// host but its argument block and can be captured in a CUDA graph.
#include "cuda/scalar.cuh"
#include "optim.h"

namespace ehm::cuda {
namespace {

constexpr int kThreads = 512;
// Elements per block: each chunk of a table is split over kSplit blocks (grid axis y), so that a
// bucket of ~10 M elements runs ~1,300 blocks, not ~160 (too few in flight to reach the bandwidth).
constexpr int64_t kSub = 1 << 13;
constexpr int kSplit = static_cast<int>(kOptimChunk / kSub);
constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 320;

// 8 * 24 * 8 + 24 * 8 + 320 * 5 + 8 bytes: about 3.3 KB, under the classic 4 KB argument limit.
struct Table {
  void* ptr[8][kMaxTensors];  // param, grad, ref_grad, anchor, state1, state2, direction, step count
  const float* found_inf;
  int64_t size[kMaxTensors];
  int chunk[kMaxBlocks];
  unsigned char tensor[kMaxBlocks];
};

enum Slot { kParam, kGrad, kRef, kAnchor, kState1, kState2, kDir, kStep, kSlots };

__device__ __forceinline__ float ieee_sqrt(float x) { return __fsqrt_rn(x); }
__device__ __forceinline__ double ieee_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float ieee_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double ieee_div(double a, double b) { return a / b; }

struct Flags {
  bool cv, dir, state1, decoupled, nesterov, first;
};

template <typename T>
struct Chunk : TensorViews<T, acc_t<T>> {
  int64_t begin, end;
};

template <typename T>
__device__ __forceinline__ Chunk<T> chunk_of(const Table& tab) {
  using A = acc_t<T>;
  const int t = tab.tensor[blockIdx.x];
  const int64_t chunk_begin = int64_t(tab.chunk[blockIdx.x]) * kOptimChunk;
  const int64_t end = min(min(tab.size[t], chunk_begin + kOptimChunk), chunk_begin + (blockIdx.y + 1) * kSub);
  const int64_t begin = min(chunk_begin + blockIdx.y * kSub, end);
  Chunk<T> c;
  c.p = static_cast<T*>(tab.ptr[kParam][t]);
  c.g = static_cast<const T*>(tab.ptr[kGrad][t]);
  c.gr = static_cast<const T*>(tab.ptr[kRef][t]);
  c.an = static_cast<const A*>(tab.ptr[kAnchor][t]);
  c.s1 = static_cast<A*>(tab.ptr[kState1][t]);
  c.s2 = static_cast<A*>(tab.ptr[kState2][t]);
  c.dir = static_cast<A*>(tab.ptr[kDir][t]);
  c.step = static_cast<const float*>(tab.ptr[kStep][t]);
  c.begin = begin;
  c.end = (tab.found_inf && *tab.found_inf != 0.0f) ? begin : end;
  return c;
}

template <typename T, typename A>
__device__ __forceinline__ A direction_at(const Chunk<T>& c, int64_t i, A alpha, bool cv) {
  const A g = to_acc(c.g[i]);
  if (!cv) return g;
  return (g - alpha * to_acc(c.gr[i])) + alpha * c.an[i];
}

template <typename T>
__global__ void __launch_bounds__(kThreads) adam_kernel(Table tab, AdamScalars s, Flags f) {
  using A = acc_t<T>;
  const Chunk<T> c = chunk_of<T>(tab);
  const A alpha = A(s.alpha), wd = A(s.weight_decay), eps = A(s.eps), beta2 = A(s.beta2);
  const A w1 = A(1 - s.beta1), w2 = A(1 - s.beta2);
  const A decay = A(1 - s.lr * s.weight_decay);
  double step_size = s.step_size, bc2_sqrt = s.bias_correction2_sqrt;
  if (c.step) {  // as torch.optim.Adam: in double, from this tensor's count
    const double t = *c.step;
    step_size = s.lr / (1 - pow(s.beta1, t));
    bc2_sqrt = pow(1 - pow(s.beta2, t), 0.5);
  }
  const A neg_step = A(-step_size), bc2 = A(bc2_sqrt);
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kThreads) {
    A param = to_acc(c.p[i]);
    A d = direction_at(c, i, alpha, f.cv);
    if (f.dir) c.dir[i] = d;
    if (wd != A(0)) {
      if (f.decoupled) param = param * decay;
      else d = d + wd * param;
    }
    A m = c.s1[i];
    m = w1 < A(0.5) ? m + w1 * (d - m) : d - (d - m) * (A(1) - w1);
    const A v = c.s2[i] * beta2 + w2 * d * d;
    c.s1[i] = m;
    c.s2[i] = v;
    const A denom = ieee_div(ieee_sqrt(v), bc2) + eps;
    c.p[i] = from_acc<T>(param + ieee_div(neg_step * m, denom));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sgd_kernel(Table tab, SgdScalars s, Flags f) {
  using A = acc_t<T>;
  const Chunk<T> c = chunk_of<T>(tab);
  const A alpha = A(s.alpha), wd = A(s.weight_decay), mom = A(s.momentum), keep = A(1 - s.dampening);
  const A neg_lr = A(-s.lr);
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kThreads) {
    const A param = to_acc(c.p[i]);
    A d = direction_at(c, i, alpha, f.cv);
    if (f.dir) c.dir[i] = d;
    if (wd != A(0)) d = d + wd * param;
    if (f.state1) {
      const A b = f.first ? d : c.s1[i] * mom + keep * d;
      c.s1[i] = b;
      d = f.nesterov ? d + mom * b : b;
    }
    c.p[i] = from_acc<T>(param + neg_lr * d);
  }
}

// Packs tensors and their chunks into tables and calls launch(table, blocks) whenever one is full.
template <typename Launch>
void for_each_table(const TensorLists& l, Launch launch) {
  const void* const* lists[kSlots] = {l.param, l.grad, l.ref_grad, l.anchor, l.state1, l.state2, l.direction, l.step};
  Table tab{};
  tab.found_inf = l.found_inf;
  int tensors = 0, blocks = 0;
  for (int64_t t = 0; t < l.n; ++t) {
    if (l.sizes[t] == 0) continue;
    int slot = tensors++;
    for (int k = 0; k < kSlots; ++k) tab.ptr[k][slot] = lists[k] ? const_cast<void*>(lists[k][t]) : nullptr;
    tab.size[slot] = l.sizes[t];
    const int64_t chunks = (l.sizes[t] + kOptimChunk - 1) / kOptimChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      tab.tensor[blocks] = static_cast<unsigned char>(slot);
      tab.chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == kMaxBlocks || (tensors == kMaxTensors && last_chunk)) {
        launch(tab, blocks);
        blocks = 0;
        if (last_chunk) {
          tensors = 0;
        } else {  // the tensor goes on in the next table, in slot 0
          for (int k = 0; k < kSlots; ++k) tab.ptr[k][0] = tab.ptr[k][slot];
          tab.size[0] = tab.size[slot];
          slot = 0;  // its remaining chunks must name slot 0, which the next tensors do not reuse
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) launch(tab, blocks);
}

}  // namespace

void cv_adam(DType dtype, const TensorLists& lists, const AdamScalars& s, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  const Flags f{lists.ref_grad != nullptr, lists.direction != nullptr, true, s.decoupled, false, false};
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    for_each_table(lists, [&](const Table& tab, int blocks) {
      adam_kernel<T><<<dim3(blocks, kSplit), kThreads, 0, st>>>(tab, s, f);
    });
  });
}

void cv_sgd(DType dtype, const TensorLists& lists, const SgdScalars& s, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  const Flags f{lists.ref_grad != nullptr, lists.direction != nullptr, lists.state1 != nullptr, false, s.nesterov,
                s.first};
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    for_each_table(lists, [&](const Table& tab, int blocks) {
      sgd_kernel<T><<<dim3(blocks, kSplit), kThreads, 0, st>>>(tab, s, f);
    });
  });
}

}  // namespace ehm::cuda
