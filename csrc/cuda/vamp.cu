// CUDA kernels of the VampPrior. A block of 256 threads computes a 16 x 16 tile of
// -log N(z_b; mu_k, exp(lv_k)) (thread (b, k) of the tile), staging 32-wide slices of the codes
// and components in shared memory; the [B, K, D] terms live only in registers.
//   forward: a block per tile of 16 codes walks all components with an online (max, sum);
//   backward (codes): the same walk recomputes the responsibilities and accumulates the code
//     gradients of its 16 codes in shared memory;
//   backward (components): a block per (tile of 16 components, chunk of the batch) accumulates
//     their gradients in shared memory and writes one partial per chunk (the entry adds them).
#include <cmath>

#include "cuda/scalar.cuh"
#include "terms.h"
#include "vamp.h"

namespace ehm::cuda {
namespace {

constexpr int kTB = 16, kTK = 16, kThreads = kTB * kTK;  // tile of codes x components
constexpr int kDC = 32;                                  // slice of the code dimension staged at once
constexpr int64_t kTargetBlocks = 512;
constexpr int kDefaultShared = 48 * 1024;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename A>
struct Stage {
  A z[kTB][kDC + 1];   // codes
  A mu[kTK][kDC + 1];  // component means
  A iv[kTK][kDC + 1];  // exp(-lv)
  A c[kTK][kDC + 1];   // lv / 2 + log(2 pi) / 2
};

// -log N(z_{b0+tb}; mu_{k0+tk}, .) for this thread's (tb, tk); 0 terms outside [B) x [K) x [D).
// Each slice of kDC terms is summed in A and the slices in double: one float sum over D = 600
// terms adding up to ~1e3 loses ~1e-3, which moves the responsibilities of competing components
// by as much (the CPU kernel sums in double for the same reason).
template <typename T, typename A>
__device__ A neg_log_normal_tile(const T* z, const T* mu, const T* lv, int64_t B, int64_t K, int64_t D, int64_t b0,
                                 int64_t k0, Stage<A>& st) {
  const int tb = threadIdx.x / kTK, tk = threadIdx.x % kTK;
  double t = 0;
  for (int64_t d0 = 0; d0 < D; d0 += kDC) {
    __syncthreads();  // the previous slice has been used
    for (int idx = threadIdx.x; idx < kTB * kDC; idx += kThreads) {
      const int r = idx / kDC, j = idx % kDC;
      const int64_t b = b0 + r, dd = d0 + j;
      st.z[r][j] = b < B && dd < D ? to_acc(z[b * D + dd]) : A(0);
    }
    for (int idx = threadIdx.x; idx < kTK * kDC; idx += kThreads) {
      const int r = idx / kDC, j = idx % kDC;
      const int64_t k = k0 + r, dd = d0 + j;
      const bool ok = k < K && dd < D;
      const A l = ok ? to_acc(lv[k * D + dd]) : A(0);
      st.mu[r][j] = ok ? to_acc(mu[k * D + dd]) : A(0);
      st.iv[r][j] = ok ? exp(-l) : A(0);
      st.c[r][j] = ok ? A(0.5) * l + A(terms::kHalfLog2Pi) : A(0);
    }
    __syncthreads();
    A part = 0;
#pragma unroll 8
    for (int j = 0; j < kDC; ++j) {
      const A r = st.z[tb][j] - st.mu[tk][j];
      part += A(0.5) * r * r * st.iv[tk][j] + st.c[tk][j];
    }
    t += part;
  }
  return static_cast<A>(t);
}

// Reductions over the 16 threads of one code (consecutive lanes of a half warp).
template <typename A>
__device__ __forceinline__ A row_max(A v) {
#pragma unroll
  for (int off = kTK / 2; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off, kTK));
  return v;
}

template <typename A>
__device__ __forceinline__ A row_sum(A v) {
#pragma unroll
  for (int off = kTK / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off, kTK);
  return v;
}

// g_b * exp(-t - lse_b): the weight of component k in the gradient of code b (0 for an all -inf row).
template <typename A>
__device__ __forceinline__ A weight(A t, A lse, A g) {
  return lse == A(-INFINITY) ? A(0) : g * exp(-t - lse);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) vamp_fwd_kernel(const T* z, const T* mu, const T* lv,
                                                            const acc_t<T>* base, int64_t B, int64_t K, int64_t D,
                                                            T* out, acc_t<T>* lse) {
  using A = acc_t<T>;
  __shared__ Stage<A> st;
  const int64_t b0 = blockIdx.x * int64_t(kTB);
  const int tb = threadIdx.x / kTK, tk = threadIdx.x % kTK;
  A m = -INFINITY, s = 0;  // running max and sum of exp(x - m) of this thread's code
  for (int64_t k0 = 0; k0 < K; k0 += kTK) {
    const A t = neg_log_normal_tile<T, A>(z, mu, lv, B, K, D, b0, k0, st);
    const A x = k0 + tk < K ? -t : A(-INFINITY);
    const A new_m = fmax(m, row_max(x));
    const A e = row_sum(x == A(-INFINITY) ? A(0) : exp(x - new_m));  // NaN in x stays NaN
    s = (m == A(-INFINITY) ? A(0) : s * exp(m - new_m)) + e;
    m = new_m;
  }
  const int64_t b = b0 + tb;
  if (tk == 0 && b < B) {
    const A l = m + log(s);
    lse[b] = l;
    out[b] = from_acc<T>(log(static_cast<A>(K)) - l + (base ? base[b] : A(0)));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) vamp_bwd_z_kernel(const acc_t<T>* grad, const T* z, const T* mu,
                                                              const T* lv, const acc_t<T>* lse, int64_t B, int64_t K,
                                                              int64_t D, T* gz) {
  using A = acc_t<T>;
  __shared__ Stage<A> st;
  __shared__ A q[kTB][kTK];
  extern __shared__ __align__(16) unsigned char dynamic[];
  A* acc = reinterpret_cast<A*>(dynamic);  // [kTB][D] code gradients
  const int64_t b0 = blockIdx.x * int64_t(kTB);
  const int tb = threadIdx.x / kTK, tk = threadIdx.x % kTK;
  const int64_t b = b0 + tb;
  const A g = b < B ? grad[b] : A(0), l = b < B ? lse[b] : A(0);
  for (int64_t idx = threadIdx.x; idx < kTB * D; idx += kThreads) acc[idx] = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kTK) {
    const A t = neg_log_normal_tile<T, A>(z, mu, lv, B, K, D, b0, k0, st);
    q[tb][tk] = b < B && k0 + tk < K ? weight(t, l, g) : A(0);
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < kTB * D; idx += kThreads) {
      const int r = static_cast<int>(idx / D);
      const int64_t dd = idx % D;
      if (b0 + r >= B) continue;
      const A zv = to_acc(z[(b0 + r) * D + dd]);
      A sum = 0;
      for (int kk = 0; kk < kTK && k0 + kk < K; ++kk) {
        const int64_t o = (k0 + kk) * D + dd;
        sum += q[r][kk] * terms::code_grad<CodeKind::Latent, A>(zv, to_acc(mu[o]), to_acc(lv[o]), A(0)).da;
      }
      acc[idx] += sum;
    }
    // the next tile's first __syncthreads() protects q
  }
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < kTB * D; idx += kThreads)
    if (b0 + idx / D < B) gz[b0 * D + idx] = from_acc<T>(acc[idx]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) vamp_bwd_k_kernel(const acc_t<T>* grad, const T* z, const T* mu,
                                                              const T* lv, const acc_t<T>* lse, int64_t B, int64_t K,
                                                              int64_t D, int64_t rows_per_chunk, acc_t<T>* gmu,
                                                              acc_t<T>* glv) {
  using A = acc_t<T>;
  __shared__ Stage<A> st;
  __shared__ A q[kTB][kTK];
  extern __shared__ __align__(16) unsigned char dynamic[];
  A* acc_mu = reinterpret_cast<A*>(dynamic);  // [kTK][D]
  A* acc_lv = acc_mu + kTK * D;               // [kTK][D]
  const int64_t k0 = blockIdx.x * int64_t(kTK), chunk = blockIdx.y;
  const int64_t r0 = chunk * rows_per_chunk, r1 = r0 + rows_per_chunk < B ? r0 + rows_per_chunk : B;
  const int tb = threadIdx.x / kTK, tk = threadIdx.x % kTK;
  for (int64_t idx = threadIdx.x; idx < kTK * D; idx += kThreads) acc_mu[idx] = acc_lv[idx] = 0;
  for (int64_t b0 = r0; b0 < r1; b0 += kTB) {
    const A t = neg_log_normal_tile<T, A>(z, mu, lv, r1, K, D, b0, k0, st);
    const int64_t b = b0 + tb;
    q[tb][tk] = b < r1 && k0 + tk < K ? weight(t, lse[b], grad[b]) : A(0);
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < kTK * D; idx += kThreads) {
      const int r = static_cast<int>(idx / D);
      const int64_t dd = idx % D;
      if (k0 + r >= K) continue;
      const A mv = to_acc(mu[(k0 + r) * D + dd]), lvv = to_acc(lv[(k0 + r) * D + dd]);
      A sum_mu = 0, sum_lv = 0;
      for (int bb = 0; bb < kTB && b0 + bb < r1; ++bb) {
        const auto t = terms::code_grad<CodeKind::Latent, A>(to_acc(z[(b0 + bb) * D + dd]), mv, lvv, A(0));
        sum_mu += q[bb][r] * t.db;
        sum_lv += q[bb][r] * t.dc;
      }
      acc_mu[idx] += sum_mu;
      acc_lv[idx] += sum_lv;
    }
  }
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < kTK * D; idx += kThreads) {
    if (k0 + idx / D >= K) continue;
    const int64_t o = chunk * K * D + k0 * D + idx;
    if (gmu) gmu[o] = acc_mu[idx];
    if (glv) glv[o] = acc_lv[idx];
  }
}

template <typename A>
int64_t bytes_z(int64_t D) { return kTB * D * static_cast<int64_t>(sizeof(A)); }
template <typename A>
int64_t bytes_k(int64_t D) { return 2 * kTK * D * static_cast<int64_t>(sizeof(A)); }

// Lets `kernel` use `bytes` of dynamic shared memory (past the 48 KiB default needs an opt-in).
template <typename K>
void allow_shared(K kernel, int64_t bytes) {
  if (bytes > kDefaultShared)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace

int64_t vamp_max_code_size(DType dtype) {
  int device = 0, optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const int64_t elem = dtype == DType::Float64 ? 8 : 4;
  const int64_t static_bytes = 4 * kTB * (kDC + 1) * elem + kTB * kTK * elem;
  return (optin - static_bytes) / (2 * kTK * elem);
}

int64_t vamp_rows_per_chunk(int64_t B, int64_t K) {
  const int64_t tiles = cdiv(B, kTB), by_blocks = cdiv(kTargetBlocks, cdiv(K, kTK));
  const int64_t chunks = tiles < by_blocks ? tiles : by_blocks;
  return cdiv(B, chunks > 1 ? chunks : 1);
}

void vamp_fwd(DType dtype, const void* z, const void* mu, const void* lv, const void* base, int64_t B, int64_t K,
              int64_t D, void* out, void* lse, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    vamp_fwd_kernel<T><<<static_cast<unsigned>(cdiv(B, kTB)), kThreads, 0, st>>>(
        static_cast<const T*>(z), static_cast<const T*>(mu), static_cast<const T*>(lv), static_cast<const A*>(base), B,
        K, D, static_cast<T*>(out), static_cast<A*>(lse));
  });
}

void vamp_bwd(DType dtype, const void* grad, const void* z, const void* mu, const void* lv, const void* lse, int64_t B,
              int64_t K, int64_t D, void* gz, void* gmu_partial, void* glv_partial, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    if (gz) {
      const int64_t bytes = bytes_z<A>(D);
      allow_shared(vamp_bwd_z_kernel<T>, bytes);
      vamp_bwd_z_kernel<T><<<static_cast<unsigned>(cdiv(B, kTB)), kThreads, bytes, st>>>(
          static_cast<const A*>(grad), static_cast<const T*>(z), static_cast<const T*>(mu), static_cast<const T*>(lv),
          static_cast<const A*>(lse), B, K, D, static_cast<T*>(gz));
    }
    if (gmu_partial || glv_partial) {
      const int64_t rows = vamp_rows_per_chunk(B, K);
      const int64_t bytes = bytes_k<A>(D);
      allow_shared(vamp_bwd_k_kernel<T>, bytes);
      const dim3 grid(static_cast<unsigned>(cdiv(K, kTK)), static_cast<unsigned>(cdiv(B, rows)));
      vamp_bwd_k_kernel<T><<<grid, kThreads, bytes, st>>>(
          static_cast<const A*>(grad), static_cast<const T*>(z), static_cast<const T*>(mu), static_cast<const T*>(lv),
          static_cast<const A*>(lse), B, K, D, rows, static_cast<A*>(gmu_partial), static_cast<A*>(glv_partial));
    }
  });
}

}  // namespace ehm::cuda
