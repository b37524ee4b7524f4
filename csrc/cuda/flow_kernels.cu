// CUDA kernels of the fused flow ops (math and ABI: docs/kernels.md).
//
// All ops are memory-bound (a few flops per byte), so the kernels are organised around
// moving bytes:
// * 16-byte vector loads/stores (4 float, 2 double, 8 half/bf16 per access) whenever the
//   row length H·D and every base pointer allow it, scalar accesses otherwise;
// * the reductions (flow_step, chain_logprob fwd, cfm_loss fwd) use one 256-thread block per
//   reduced row and issue the loads of up to two 16-byte packs per thread before using them
//   (unroll_for): for π0 shapes (H·D = 1600) a whole row is requested at once, which hides
//   DRAM latency even at the 2 resident blocks per SM that B = 256 gives;
// * the elementwise kernels (backwards, interpolate) give each thread one 16-byte pack and
//   launch rows × ceil(H·D / (256·VEC)) blocks, enough to fill every SM.
// * Reductions are deterministic: a fixed per-thread partition, warp shuffles, then one warp
//   over the per-warp partials in shared memory. No atomics.
//
// Arithmetic that produces stored values (means, next states, gradients, interpolants) uses
// the explicitly rounded intrinsics (__fmul_rn, __fadd_rn, __fdiv_rn, ...). That keeps it
// out of FMA contraction and of --use_fast_math's approximate division/sqrt, so it rounds
// like the float32 torch reference, and flow_step and chain_logprob, which share
// transition_mean(), compute bit-identical means from the same inputs (chain_logprob then
// recovers exactly the z that flow_step used).
#include "flow_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>

#include <initializer_list>
#include <limits>
#include <type_traits>

namespace flowkernels {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;
constexpr double kHalfLog2Pi = 0.91893853320467274178032973640561764;

// ---------------------------------------------------------------------------------------
// Element types: storage T, accumulation acc_t<T> (float, double for double).
// ---------------------------------------------------------------------------------------
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even conversion from the accumulation type, as torch's .to(dtype).
template <typename T>
struct Store;
template <>
struct Store<float> {
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <>
struct Store<double> {
  static __device__ __forceinline__ double from(double x) { return x; }
};
template <>
struct Store<__half> {
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Store<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x) {
  return Store<T>::from(x);
}

// Correctly rounded, never-contracted arithmetic (see the file comment).
__device__ __forceinline__ float op_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double op_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float op_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double op_sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float op_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double op_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float op_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double op_div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float op_sqrt(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double op_sqrt(double a) { return __dsqrt_rn(a); }
// logf would become lg2.approx under --use_fast_math; the double log is never substituted.
__device__ __forceinline__ float op_log(float a) { return log_f32(a); }
__device__ __forceinline__ double op_log(double a) { return log(a); }

// ---------------------------------------------------------------------------------------
// Vector memory access: VEC consecutive elements moved as one 2/4/8/16-byte access.
// ---------------------------------------------------------------------------------------
template <int Bytes>
struct RawBits;
template <>
struct RawBits<2> {
  using type = unsigned short;
};
template <>
struct RawBits<4> {
  using type = unsigned int;
};
template <>
struct RawBits<8> {
  using type = uint2;
};
template <>
struct RawBits<16> {
  using type = uint4;
};

template <typename T, int VEC>
struct Pack {
  T v[VEC];
};

template <typename T>
__host__ __device__ constexpr int max_vec() {
  return 16 / static_cast<int>(sizeof(T));
}

// Packs a reduction thread loads before using them. Two 16-byte packs per input for 4- and
// 8-byte types; one for 2-byte types, whose 8-element packs already cover 2048 elements per
// block iteration (more than a π0 row of 50·32) and whose fully unrolled math would
// otherwise need ~128 registers and halve the resident blocks per SM.
template <typename T, int VEC>
__host__ __device__ constexpr int unroll_for() {
  return VEC == 8 ? 1 : 2;
}

// Read-only inputs go through the non-coherent path (ld.global.nc): they are never written
// by the kernel, and the slices that neighbouring blocks share (chain states, cfm actions)
// then hit L1/L2 instead of DRAM.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  using Raw = typename RawBits<sizeof(T) * VEC>::type;
  const Raw raw = __ldg(reinterpret_cast<const Raw*>(p));
  Pack<T, VEC> out;
  memcpy(&out, &raw, sizeof(Raw));
  return out;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& pk) {
  using Raw = typename RawBits<sizeof(T) * VEC>::type;
  Raw raw;
  memcpy(&raw, &pk, sizeof(Raw));
  *reinterpret_cast<Raw*>(p) = raw;
}

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> fill_pack(acc_t<T> value) {
  Pack<T, VEC> out;
#pragma unroll
  for (int i = 0; i < VEC; ++i) out.v[i] = from_acc<T>(value);
  return out;
}

// Element weight w = sm[b, h]·dm[b, d] (the mask rows are tiny and stay in L1).
template <typename A>
__device__ __forceinline__ A weight(const float* smr, const float* dmr, int h, int d) {
  return op_mul(static_cast<A>(__ldg(smr + h)), static_cast<A>(__ldg(dmr + d)));
}

// Sum over the block; the result is valid in thread 0. Must be reached by all threads.
template <typename A>
__device__ __forceinline__ A block_reduce_sum(A value) {
  __shared__ A warp_sums[kWarps];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) value += __shfl_down_sync(0xffffffffu, value, o);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // a previous call's readers are done with warp_sums
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  A total = 0;
  if (warp == 0) {
    total = lane < kWarps ? warp_sums[lane] : A(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) total += __shfl_down_sync(0xffffffffu, total, o);
  }
  return total;
}

// ---------------------------------------------------------------------------------------
// Transition math, shared by flow_step and chain_logprob.
// ---------------------------------------------------------------------------------------

// Flow-SDE coefficients, evaluated in the reference's operation order:
// tn = t − dt; t* = (t == 1) ? 1 − dt : t; σ = a·sqrt(t / (1 − t*)); k = σ²·dt / (2t);
// 1 − t* is taken as dt at t = 1 (exact; 1 − (1 − dt) loses dt's digits, and all of them for dt < 2⁻²⁴).
// c_x = 1 − k; c_v = −(1 − tn)·t + (tn − k)·(1 − t); s = σ·sqrt(dt).
template <typename A>
__device__ __forceinline__ void sde_coefficients(A t, A dt, A a, A& c_x, A& c_v, A& s) {
  const A one = 1;
  const A tn = op_sub(t, dt);
  const A one_minus_t_star = t == one ? dt : op_sub(one, t);
  const A sigma = op_mul(a, op_sqrt(op_div(t, one_minus_t_star)));
  const A k = op_div(op_mul(op_mul(sigma, sigma), dt), op_mul(A(2), t));
  c_x = op_sub(one, k);
  c_v = op_add(op_mul(-op_sub(one, tn), t), op_mul(op_sub(tn, k), op_sub(one, t)));
  s = op_mul(sigma, op_sqrt(dt));
}

// sde: c_x·x + c_v·v; ode and noise: x − dt·v.
template <typename A>
__device__ __forceinline__ A transition_mean(int mode, A x, A v, A c_x, A c_v, A dt) {
  return mode == kModeSDE ? op_add(op_mul(c_x, x), op_mul(c_v, v)) : op_sub(x, op_mul(dt, v));
}

// −log s − ½log 2π: per sample (sde) or per element (noise).
template <typename A>
__device__ __forceinline__ A log_normalizer(A s) {
  return op_sub(-op_log(s), A(kHalfLog2Pi));
}

// log N(x'; mean, s²) = (−log s − ½log 2π) − ½z².
template <typename A>
__device__ __forceinline__ A gaussian_term(A normalizer, A z) {
  return op_sub(normalizer, op_mul(op_mul(A(0.5), z), z));
}

// ---------------------------------------------------------------------------------------
// flow_step_fwd: one block per sample b.
// ---------------------------------------------------------------------------------------
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock)
    flow_step_fwd_kernel(const T* __restrict__ x, const T* __restrict__ v,
                         const float* __restrict__ t, acc_t<T> dt, int mode,
                         const T* __restrict__ noise, const T* __restrict__ std_, uint64_t seed,
                         uint64_t offset, acc_t<T> noise_level, const float* __restrict__ sm,
                         int64_t sm_bstride, const float* __restrict__ dm, int64_t dm_bstride,
                         int64_t B, int H, int D, T* __restrict__ mean_out,
                         T* __restrict__ xn_out, acc_t<T>* __restrict__ logp) {
  using A = acc_t<T>;
  constexpr int kUnroll = unroll_for<T, VEC>();
  const int n = H * D;
  const bool stochastic = mode != kModeODE;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const int64_t row = b * n;
    const float* smr = sm + b * sm_bstride;
    const float* dmr = dm + b * dm_bstride;
    A c_x = 0, c_v = 0, s_sde = 0, norm_sde = 0;
    if (mode == kModeSDE) {
      sde_coefficients<A>(static_cast<A>(__ldg(t + b)), dt, noise_level, c_x, c_v, s_sde);
      if (s_sde > A(0)) norm_sde = log_normalizer(s_sde);
    }
    A sum = 0;
    for (int j0 = threadIdx.x * VEC; j0 < n; j0 += kBlock * VEC * kUnroll) {
      // Issue every load of this iteration before the math.
      Pack<T, VEC> px[kUnroll], pv[kUnroll], pe[kUnroll], ps[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = j0 + u * kBlock * VEC;
        if (j < n) {
          px[u] = load_pack<T, VEC>(x + row + j);
          pv[u] = load_pack<T, VEC>(v + row + j);
          if (stochastic && noise != nullptr) pe[u] = load_pack<T, VEC>(noise + row + j);
          if (mode == kModeNoise) ps[u] = load_pack<T, VEC>(std_ + row + j);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = j0 + u * kBlock * VEC;
        if (j >= n) continue;
        int h = j / D;
        int d = j - h * D;
        Pack<T, VEC> pm, pn;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const A mean = transition_mean(mode, to_acc(px[u].v[i]), to_acc(pv[u].v[i]), c_x, c_v, dt);
          pm.v[i] = from_acc<T>(mean);
          if (stochastic) {
            const A s = mode == kModeSDE ? s_sde : to_acc(ps[u].v[i]);
            const A eps = noise != nullptr
                              ? to_acc(pe[u].v[i])
                              : static_cast<A>(philox_normal_f32(
                                    seed, offset + static_cast<uint64_t>(row + j + i)));
            const T xn = from_acc<T>(op_add(mean, op_mul(s, eps)));
            pn.v[i] = xn;
            if (s > A(0)) {
              // z from the stored (rounded) x_next, as chain_logprob will see it.
              const A z = op_div(op_sub(to_acc(xn), mean), s);
              const A norm = mode == kModeSDE ? norm_sde : log_normalizer(s);
              sum += weight<A>(smr, dmr, h, d) * gaussian_term(norm, z);
            }
          }
          if (++d == D) {
            d = 0;
            ++h;
          }
        }
        store_pack<T, VEC>(mean_out + row + j, pm);
        if (stochastic) store_pack<T, VEC>(xn_out + row + j, pn);
      }
    }
    const A total = block_reduce_sum(sum);
    if (threadIdx.x == 0) logp[b] = total;
  }
}

// ---------------------------------------------------------------------------------------
// chain_logprob_fwd: one block per (b, term); term 0 is the initial log N(x_0; 0, I).
// ---------------------------------------------------------------------------------------
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock)
    chain_logprob_fwd_kernel(const T* __restrict__ chain, const T* __restrict__ v, int64_t Kv,
                             const float* __restrict__ t_grid, int mode,
                             const T* __restrict__ std_, const int64_t* __restrict__ steps,
                             bool include_initial, acc_t<T> noise_level,
                             const float* __restrict__ sm, int64_t sm_bstride,
                             const float* __restrict__ dm, int64_t dm_bstride, int64_t B,
                             int64_t K, int H, int D, acc_t<T>* __restrict__ terms) {
  using A = acc_t<T>;
  constexpr int kUnroll = unroll_for<T, VEC>();
  const int n = H * D;
  const int64_t n_terms = K + 1;
  for (int64_t r = blockIdx.x; r < B * n_terms; r += gridDim.x) {
    const int64_t b = r / n_terms;
    const int64_t term = r - b * n_terms;
    const int64_t k = term - 1;
    bool valid = true;
    bool selected = true;
    if (steps != nullptr) {
      const int64_t k_sel = __ldg(steps + b);
      valid = k_sel >= 0 && k_sel < K;
      selected = k == k_sel;
    }
    const float* smr = sm + b * sm_bstride;
    const float* dmr = dm + b * dm_bstride;
    A sum = 0;
    // Both branches are uniform over the block, so every thread reaches the reduction.
    if (valid && term == 0 && include_initial) {
      const T* x0 = chain + b * n_terms * n;
      for (int j0 = threadIdx.x * VEC; j0 < n; j0 += kBlock * VEC * kUnroll) {
        Pack<T, VEC> px[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int j = j0 + u * kBlock * VEC;
          if (j < n) px[u] = load_pack<T, VEC>(x0 + j);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int j = j0 + u * kBlock * VEC;
          if (j >= n) continue;
          int h = j / D;
          int d = j - h * D;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const A xi = to_acc(px[u].v[i]);
            const A elem = op_sub(A(-kHalfLog2Pi), op_mul(op_mul(A(0.5), xi), xi));
            sum += weight<A>(smr, dmr, h, d) * elem;
            if (++d == D) {
              d = 0;
              ++h;
            }
          }
        }
      }
    } else if (valid && term > 0 && selected) {
      const T* xk = chain + (b * n_terms + k) * n;
      const T* xn = xk + n;
      const T* vk = v + (b * Kv + (Kv == K ? k : 0)) * n;
      const T* sk = mode == kModeNoise ? std_ + (b * K + k) * n : nullptr;
      const A tk = static_cast<A>(__ldg(t_grid + k));
      const A dtk = op_sub(tk, static_cast<A>(__ldg(t_grid + k + 1)));
      A c_x = 0, c_v = 0, s_sde = 0, norm_sde = 0;
      if (mode == kModeSDE) {
        sde_coefficients<A>(tk, dtk, noise_level, c_x, c_v, s_sde);
        if (s_sde > A(0)) norm_sde = log_normalizer(s_sde);
      }
      for (int j0 = threadIdx.x * VEC; j0 < n; j0 += kBlock * VEC * kUnroll) {
        Pack<T, VEC> px[kUnroll], pn[kUnroll], pv[kUnroll], ps[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int j = j0 + u * kBlock * VEC;
          if (j < n) {
            px[u] = load_pack<T, VEC>(xk + j);
            pn[u] = load_pack<T, VEC>(xn + j);
            pv[u] = load_pack<T, VEC>(vk + j);
            if (mode == kModeNoise) ps[u] = load_pack<T, VEC>(sk + j);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int j = j0 + u * kBlock * VEC;
          if (j >= n) continue;
          int h = j / D;
          int d = j - h * D;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const A s = mode == kModeSDE ? s_sde : to_acc(ps[u].v[i]);
            if (s > A(0)) {
              const A mean = transition_mean(mode, to_acc(px[u].v[i]), to_acc(pv[u].v[i]), c_x, c_v, dtk);
              const A z = op_div(op_sub(to_acc(pn[u].v[i]), mean), s);
              const A norm = mode == kModeSDE ? norm_sde : log_normalizer(s);
              sum += weight<A>(smr, dmr, h, d) * gaussian_term(norm, z);
            }
            if (++d == D) {
              d = 0;
              ++h;
            }
          }
        }
      }
    }
    const A total = block_reduce_sum(sum);
    if (threadIdx.x == 0) terms[r] = valid ? total : A(NAN);
  }
}

// ---------------------------------------------------------------------------------------
// chain_logprob_bwd: elementwise over (b, slot, chunk of H·D).
//
// Slots: without steps, slot k is step k (n_slots = K). With steps, the selected step k*
// gets the gradient and every other slot of grad_v / grad_std is zero; n_slots = K, except
// for mode sde with a one-step v (n_slots = 1: slot 0 is step k*). With a one-step v and a
// K-step std (mode noise, n_slots = K), grad_v[b, 0] is written by slot k* only.
// ---------------------------------------------------------------------------------------
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock)
    chain_logprob_bwd_kernel(const acc_t<T>* __restrict__ grad_terms, const T* __restrict__ chain,
                             const T* __restrict__ v, int64_t Kv, const float* __restrict__ t_grid,
                             int mode, const T* __restrict__ std_,
                             const int64_t* __restrict__ steps, acc_t<T> noise_level,
                             const float* __restrict__ sm, int64_t sm_bstride,
                             const float* __restrict__ dm, int64_t dm_bstride, int64_t B,
                             int64_t K, int H, int D, int64_t n_slots, int64_t chunks,
                             T* __restrict__ grad_v, T* __restrict__ grad_std) {
  using A = acc_t<T>;
  const int n = H * D;
  const bool v_single = Kv == 1 && n_slots > 1;
  for (int64_t blk = blockIdx.x; blk < B * n_slots * chunks; blk += gridDim.x) {
    const int64_t row = blk / chunks;  // row = b·n_slots + slot
    const int64_t chunk = blk - row * chunks;
    const int j = static_cast<int>(chunk) * (kBlock * VEC) + threadIdx.x * VEC;
    if (j >= n) continue;
    const int64_t b = row / n_slots;
    const int64_t slot = row - b * n_slots;
    int64_t k = slot;
    bool valid = true;
    bool active = true;
    if (steps != nullptr) {
      k = __ldg(steps + b);
      valid = k >= 0 && k < K;
      active = n_slots == 1 || slot == k;
    }
    Pack<T, VEC> gv, gs;
    if (!valid) {
      gv = fill_pack<T, VEC>(A(NAN));
      gs = gv;
    } else if (!active) {
      gv = fill_pack<T, VEC>(A(0));
      gs = gv;
    } else {
      const T* xk = chain + (b * (K + 1) + k) * n + j;
      const T* vk = v + (b * Kv + (Kv == K ? k : 0)) * n + j;
      const Pack<T, VEC> px = load_pack<T, VEC>(xk);
      const Pack<T, VEC> pn = load_pack<T, VEC>(xk + n);
      const Pack<T, VEC> pv = load_pack<T, VEC>(vk);
      Pack<T, VEC> ps;
      if (mode == kModeNoise) ps = load_pack<T, VEC>(std_ + (b * K + k) * n + j);
      const A g = grad_terms[b * (K + 1) + k + 1];
      const A tk = static_cast<A>(__ldg(t_grid + k));
      const A dtk = op_sub(tk, static_cast<A>(__ldg(t_grid + k + 1)));
      A c_x = 0, c_v = 0, s_sde = 0;
      if (mode == kModeSDE) sde_coefficients<A>(tk, dtk, noise_level, c_x, c_v, s_sde);
      const A dmean_dv = mode == kModeSDE ? c_v : -dtk;
      const float* smr = sm + b * sm_bstride;
      const float* dmr = dm + b * dm_bstride;
      int h = j / D;
      int d = j - h * D;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const A s = mode == kModeSDE ? s_sde : to_acc(ps.v[i]);
        A dv = 0, ds = 0;
        if (s > A(0)) {
          const A mean = transition_mean(mode, to_acc(px.v[i]), to_acc(pv.v[i]), c_x, c_v, dtk);
          const A z = op_div(op_sub(to_acc(pn.v[i]), mean), s);
          const A gw = op_mul(g, weight<A>(smr, dmr, h, d));
          dv = op_mul(op_div(op_mul(gw, z), s), dmean_dv);
          ds = op_div(op_mul(gw, op_sub(op_mul(z, z), A(1))), s);
        }
        gv.v[i] = from_acc<T>(dv);
        gs.v[i] = from_acc<T>(ds);
        if (++d == D) {
          d = 0;
          ++h;
        }
      }
    }
    // grad_v rows follow the slots, except for a one-step v beside a K-step std.
    if (!v_single) {
      store_pack<T, VEC>(grad_v + row * n + j, gv);
    } else if (valid ? active : slot == 0) {
      store_pack<T, VEC>(grad_v + b * n + j, gv);
    }
    if (grad_std != nullptr) store_pack<T, VEC>(grad_std + row * n + j, gs);
  }
}

// ---------------------------------------------------------------------------------------
// cfm_loss_fwd: one block per (b, n). Consecutive blocks share actions[b], which is then
// read from L2 rather than DRAM.
// ---------------------------------------------------------------------------------------
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock)
    cfm_loss_fwd_kernel(const T* __restrict__ actions, const T* __restrict__ noise,
                        const T* __restrict__ v_pred, const float* __restrict__ sm,
                        int64_t sm_bstride, const float* __restrict__ dm, int64_t dm_bstride,
                        const float* __restrict__ inv_wsum, int64_t B, int64_t N, int H, int D,
                        acc_t<T>* __restrict__ loss) {
  using A = acc_t<T>;
  constexpr int kUnroll = unroll_for<T, VEC>();
  const int n = H * D;
  for (int64_t row = blockIdx.x; row < B * N; row += gridDim.x) {
    const int64_t b = row / N;
    const T* a_row = actions + b * n;
    const T* e_row = noise + row * n;
    const T* v_row = v_pred + row * n;
    const float* smr = sm + b * sm_bstride;
    const float* dmr = dm + b * dm_bstride;
    A sum = 0;
    for (int j0 = threadIdx.x * VEC; j0 < n; j0 += kBlock * VEC * kUnroll) {
      Pack<T, VEC> pa[kUnroll], pe[kUnroll], pv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = j0 + u * kBlock * VEC;
        if (j < n) {
          pa[u] = load_pack<T, VEC>(a_row + j);
          pe[u] = load_pack<T, VEC>(e_row + j);
          pv[u] = load_pack<T, VEC>(v_row + j);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = j0 + u * kBlock * VEC;
        if (j >= n) continue;
        int h = j / D;
        int d = j - h * D;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          // v − (ε − A)
          const A diff = op_sub(to_acc(pv[u].v[i]), op_sub(to_acc(pe[u].v[i]), to_acc(pa[u].v[i])));
          sum += weight<A>(smr, dmr, h, d) * diff * diff;
          if (++d == D) {
            d = 0;
            ++h;
          }
        }
      }
    }
    const A total = block_reduce_sum(sum);
    if (threadIdx.x == 0) loss[row] = op_mul(total, static_cast<A>(__ldg(inv_wsum + b)));
  }
}

// cfm_loss_bwd: grad_v = 2·g[b,n]·inv_wsum[b]·w·(v − ε + A), elementwise over (b·N + n, chunk).
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock)
    cfm_loss_bwd_kernel(const acc_t<T>* __restrict__ grad_loss, const T* __restrict__ actions,
                        const T* __restrict__ noise, const T* __restrict__ v_pred,
                        const float* __restrict__ sm, int64_t sm_bstride,
                        const float* __restrict__ dm, int64_t dm_bstride,
                        const float* __restrict__ inv_wsum, int64_t B, int64_t N, int H, int D,
                        int64_t chunks, T* __restrict__ grad_v) {
  using A = acc_t<T>;
  const int n = H * D;
  for (int64_t blk = blockIdx.x; blk < B * N * chunks; blk += gridDim.x) {
    const int64_t row = blk / chunks;
    const int64_t chunk = blk - row * chunks;
    const int j = static_cast<int>(chunk) * (kBlock * VEC) + threadIdx.x * VEC;
    if (j >= n) continue;
    const int64_t b = row / N;
    const Pack<T, VEC> pa = load_pack<T, VEC>(actions + b * n + j);
    const Pack<T, VEC> pe = load_pack<T, VEC>(noise + row * n + j);
    const Pack<T, VEC> pv = load_pack<T, VEC>(v_pred + row * n + j);
    const A scale = op_mul(op_mul(A(2), grad_loss[row]), static_cast<A>(__ldg(inv_wsum + b)));
    const float* smr = sm + b * sm_bstride;
    const float* dmr = dm + b * dm_bstride;
    int h = j / D;
    int d = j - h * D;
    Pack<T, VEC> out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const A diff = op_sub(to_acc(pv.v[i]), op_sub(to_acc(pe.v[i]), to_acc(pa.v[i])));
      out.v[i] = from_acc<T>(op_mul(op_mul(scale, weight<A>(smr, dmr, h, d)), diff));
      if (++d == D) {
        d = 0;
        ++h;
      }
    }
    store_pack<T, VEC>(grad_v + row * n + j, out);
  }
}

// cfm_interpolate_fwd: x_τ = τ·ε + (1 − τ)·A, elementwise over (b·N + n, chunk).
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock)
    cfm_interpolate_fwd_kernel(const T* __restrict__ actions, const T* __restrict__ noise,
                               const float* __restrict__ tau, int64_t B, int64_t N, int n,
                               int64_t chunks, T* __restrict__ x_tau) {
  using A = acc_t<T>;
  for (int64_t blk = blockIdx.x; blk < B * N * chunks; blk += gridDim.x) {
    const int64_t row = blk / chunks;
    const int64_t chunk = blk - row * chunks;
    const int j = static_cast<int>(chunk) * (kBlock * VEC) + threadIdx.x * VEC;
    if (j >= n) continue;
    const int64_t b = row / N;
    const Pack<T, VEC> pa = load_pack<T, VEC>(actions + b * n + j);
    const Pack<T, VEC> pe = load_pack<T, VEC>(noise + row * n + j);
    const A tr = static_cast<A>(__ldg(tau + row));
    const A one_minus = op_sub(A(1), tr);
    Pack<T, VEC> out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      out.v[i] = from_acc<T>(op_add(op_mul(tr, to_acc(pe.v[i])), op_mul(one_minus, to_acc(pa.v[i]))));
    }
    store_pack<T, VEC>(x_tau + row * n + j, out);
  }
}

// ---------------------------------------------------------------------------------------
// Host-side launch helpers.
// ---------------------------------------------------------------------------------------

template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float());
    case DType::kFloat64:
      return f(double());
    case DType::kFloat16:
      return f(__half());
    case DType::kBFloat16:
      return f(__nv_bfloat16());
  }
  return cudaErrorInvalidValue;
}

inline bool aligned16(const void* p) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// 16-byte accesses need every row (a multiple of H·D elements from a base pointer) to start
// on a 16-byte boundary.
template <typename T>
bool can_vectorize(int64_t n, std::initializer_list<const void*> ptrs) {
  if (n % max_vec<T>() != 0) return false;
  for (const void* p : ptrs) {
    if (!aligned16(p)) return false;
  }
  return true;
}

// Grid-stride loops in the kernels make any grid size correct; 2^31 − 1 is the x limit.
inline unsigned grid_for(int64_t blocks) {
  return static_cast<unsigned>(blocks < INT32_MAX ? blocks : INT32_MAX);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Row length H·D is indexed in 32 bits inside the kernels (row bases are 64-bit).
inline bool row_fits(int64_t H, int64_t D) {
  return H >= 0 && D >= 0 && (D == 0 || H <= static_cast<int64_t>(INT32_MAX) / D);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Launchers.
// ---------------------------------------------------------------------------------------

cudaError_t launch_flow_step_fwd(DType dtype, const void* x, const void* v, const float* t,
                                 double dt, int mode, const void* noise, const void* std_,
                                 uint64_t seed, uint64_t offset, double noise_level,
                                 const float* sm, int64_t sm_bstride, const float* dm,
                                 int64_t dm_bstride, int64_t B, int64_t H, int64_t D, void* mean,
                                 void* x_next, void* logp, cudaStream_t stream) {
  if (!row_fits(H, D) || mode < kModeODE || mode > kModeNoise) return cudaErrorInvalidValue;
  if (B <= 0) return cudaSuccess;
  const int64_t n = H * D;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* noise_t = mode == kModeODE ? nullptr : static_cast<const T*>(noise);
    const T* std_t = mode == kModeNoise ? static_cast<const T*>(std_) : nullptr;
    T* xn_t = mode == kModeODE ? nullptr : static_cast<T*>(x_next);
    const unsigned grid = grid_for(B);
    if (can_vectorize<T>(n, {x, v, noise_t, std_t, mean, xn_t})) {
      flow_step_fwd_kernel<T, max_vec<T>()><<<grid, kBlock, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(v), t, static_cast<A>(dt), mode,
          noise_t, std_t, seed, offset, static_cast<A>(noise_level), sm, sm_bstride, dm,
          dm_bstride, B, static_cast<int>(H), static_cast<int>(D), static_cast<T*>(mean), xn_t,
          static_cast<A*>(logp));
    } else {
      flow_step_fwd_kernel<T, 1><<<grid, kBlock, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(v), t, static_cast<A>(dt), mode,
          noise_t, std_t, seed, offset, static_cast<A>(noise_level), sm, sm_bstride, dm,
          dm_bstride, B, static_cast<int>(H), static_cast<int>(D), static_cast<T*>(mean), xn_t,
          static_cast<A*>(logp));
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_chain_logprob_fwd(DType dtype, const void* chain, const void* v, int64_t Kv,
                                     const float* t_grid, int mode, const void* std_,
                                     const int64_t* steps, bool include_initial,
                                     double noise_level, const float* sm, int64_t sm_bstride,
                                     const float* dm, int64_t dm_bstride, int64_t B, int64_t K,
                                     int64_t H, int64_t D, void* terms, cudaStream_t stream) {
  if (!row_fits(H, D) || K < 0 || (mode != kModeSDE && mode != kModeNoise)) {
    return cudaErrorInvalidValue;
  }
  if (B <= 0) return cudaSuccess;
  const int64_t n = H * D;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* std_t = mode == kModeNoise ? static_cast<const T*>(std_) : nullptr;
    const unsigned grid = grid_for(B * (K + 1));
    if (can_vectorize<T>(n, {chain, v, std_t})) {
      chain_logprob_fwd_kernel<T, max_vec<T>()><<<grid, kBlock, 0, stream>>>(
          static_cast<const T*>(chain), static_cast<const T*>(v), Kv, t_grid, mode, std_t,
          steps, include_initial, static_cast<A>(noise_level), sm, sm_bstride, dm, dm_bstride, B,
          K, static_cast<int>(H), static_cast<int>(D), static_cast<A*>(terms));
    } else {
      chain_logprob_fwd_kernel<T, 1><<<grid, kBlock, 0, stream>>>(
          static_cast<const T*>(chain), static_cast<const T*>(v), Kv, t_grid, mode, std_t,
          steps, include_initial, static_cast<A>(noise_level), sm, sm_bstride, dm, dm_bstride, B,
          K, static_cast<int>(H), static_cast<int>(D), static_cast<A*>(terms));
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_chain_logprob_bwd(DType dtype, const void* grad_terms, const void* chain,
                                     const void* v, int64_t Kv, const float* t_grid, int mode,
                                     const void* std_, const int64_t* steps, double noise_level,
                                     const float* sm, int64_t sm_bstride, const float* dm,
                                     int64_t dm_bstride, int64_t B, int64_t K, int64_t H,
                                     int64_t D, void* grad_v, void* grad_std,
                                     cudaStream_t stream) {
  if (!row_fits(H, D) || K < 0 || (mode != kModeSDE && mode != kModeNoise)) {
    return cudaErrorInvalidValue;
  }
  const int64_t n = H * D;
  // A one-step v with steps in mode sde has a single slot; otherwise there is one per step.
  const int64_t n_slots = (steps != nullptr && Kv == 1 && mode == kModeSDE) ? 1 : K;
  if (B <= 0 || n == 0 || n_slots == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* std_t = mode == kModeNoise ? static_cast<const T*>(std_) : nullptr;
    T* gstd_t = mode == kModeNoise ? static_cast<T*>(grad_std) : nullptr;
    if (can_vectorize<T>(n, {chain, v, std_t, grad_v, gstd_t})) {
      constexpr int V = max_vec<T>();
      const int64_t chunks = ceil_div(n, int64_t(kBlock) * V);
      chain_logprob_bwd_kernel<T, V><<<grid_for(B * n_slots * chunks), kBlock, 0, stream>>>(
          static_cast<const A*>(grad_terms), static_cast<const T*>(chain),
          static_cast<const T*>(v), Kv, t_grid, mode, std_t, steps, static_cast<A>(noise_level),
          sm, sm_bstride, dm, dm_bstride, B, K, static_cast<int>(H), static_cast<int>(D), n_slots,
          chunks, static_cast<T*>(grad_v), gstd_t);
    } else {
      const int64_t chunks = ceil_div(n, kBlock);
      chain_logprob_bwd_kernel<T, 1><<<grid_for(B * n_slots * chunks), kBlock, 0, stream>>>(
          static_cast<const A*>(grad_terms), static_cast<const T*>(chain),
          static_cast<const T*>(v), Kv, t_grid, mode, std_t, steps, static_cast<A>(noise_level),
          sm, sm_bstride, dm, dm_bstride, B, K, static_cast<int>(H), static_cast<int>(D), n_slots,
          chunks, static_cast<T*>(grad_v), gstd_t);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_cfm_loss_fwd(DType dtype, const void* actions, const void* noise,
                                const void* v_pred, const float* sm, int64_t sm_bstride,
                                const float* dm, int64_t dm_bstride, const float* inv_wsum,
                                int64_t B, int64_t N, int64_t H, int64_t D, void* loss,
                                cudaStream_t stream) {
  if (!row_fits(H, D)) return cudaErrorInvalidValue;
  if (B <= 0 || N <= 0) return cudaSuccess;
  const int64_t n = H * D;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const unsigned grid = grid_for(B * N);
    if (can_vectorize<T>(n, {actions, noise, v_pred})) {
      cfm_loss_fwd_kernel<T, max_vec<T>()><<<grid, kBlock, 0, stream>>>(
          static_cast<const T*>(actions), static_cast<const T*>(noise),
          static_cast<const T*>(v_pred), sm, sm_bstride, dm, dm_bstride, inv_wsum, B, N,
          static_cast<int>(H), static_cast<int>(D), static_cast<A*>(loss));
    } else {
      cfm_loss_fwd_kernel<T, 1><<<grid, kBlock, 0, stream>>>(
          static_cast<const T*>(actions), static_cast<const T*>(noise),
          static_cast<const T*>(v_pred), sm, sm_bstride, dm, dm_bstride, inv_wsum, B, N,
          static_cast<int>(H), static_cast<int>(D), static_cast<A*>(loss));
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_cfm_loss_bwd(DType dtype, const void* grad_loss, const void* actions,
                                const void* noise, const void* v_pred, const float* sm,
                                int64_t sm_bstride, const float* dm, int64_t dm_bstride,
                                const float* inv_wsum, int64_t B, int64_t N, int64_t H,
                                int64_t D, void* grad_v, cudaStream_t stream) {
  if (!row_fits(H, D)) return cudaErrorInvalidValue;
  const int64_t n = H * D;
  if (B <= 0 || N <= 0 || n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    if (can_vectorize<T>(n, {actions, noise, v_pred, grad_v})) {
      constexpr int V = max_vec<T>();
      const int64_t chunks = ceil_div(n, int64_t(kBlock) * V);
      cfm_loss_bwd_kernel<T, V><<<grid_for(B * N * chunks), kBlock, 0, stream>>>(
          static_cast<const A*>(grad_loss), static_cast<const T*>(actions),
          static_cast<const T*>(noise), static_cast<const T*>(v_pred), sm, sm_bstride, dm,
          dm_bstride, inv_wsum, B, N, static_cast<int>(H), static_cast<int>(D), chunks,
          static_cast<T*>(grad_v));
    } else {
      const int64_t chunks = ceil_div(n, kBlock);
      cfm_loss_bwd_kernel<T, 1><<<grid_for(B * N * chunks), kBlock, 0, stream>>>(
          static_cast<const A*>(grad_loss), static_cast<const T*>(actions),
          static_cast<const T*>(noise), static_cast<const T*>(v_pred), sm, sm_bstride, dm,
          dm_bstride, inv_wsum, B, N, static_cast<int>(H), static_cast<int>(D), chunks,
          static_cast<T*>(grad_v));
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_cfm_interpolate_fwd(DType dtype, const void* actions, const void* noise,
                                       const float* tau, int64_t B, int64_t N, int64_t H,
                                       int64_t D, void* x_tau, cudaStream_t stream) {
  if (!row_fits(H, D)) return cudaErrorInvalidValue;
  const int64_t n = H * D;
  if (B <= 0 || N <= 0 || n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (can_vectorize<T>(n, {actions, noise, x_tau})) {
      constexpr int V = max_vec<T>();
      const int64_t chunks = ceil_div(n, int64_t(kBlock) * V);
      cfm_interpolate_fwd_kernel<T, V><<<grid_for(B * N * chunks), kBlock, 0, stream>>>(
          static_cast<const T*>(actions), static_cast<const T*>(noise), tau, B, N,
          static_cast<int>(n), chunks, static_cast<T*>(x_tau));
    } else {
      const int64_t chunks = ceil_div(n, kBlock);
      cfm_interpolate_fwd_kernel<T, 1><<<grid_for(B * N * chunks), kBlock, 0, stream>>>(
          static_cast<const T*>(actions), static_cast<const T*>(noise), tau, B, N,
          static_cast<int>(n), chunks, static_cast<T*>(x_tau));
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace flowkernels
