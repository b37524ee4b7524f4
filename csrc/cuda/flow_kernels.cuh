// CUDA kernels of the fused flow ops: host launchers on raw pointers (see docs/kernels.md).
//
// This header is self-contained (CUDA runtime headers only, no ATen/c10), so the kernels
// compile with a bare `nvcc -c flow_kernels.cu` and the host glue (flow_ops_cuda.cpp) stays
// the only file that knows about torch.
//
// Conventions shared by every launcher:
// * All tensors are contiguous. Floating tensors share one element type `dtype`; masks,
//   `t`, `t_grid`, `tau` and `inv_wsum` are float32; `steps` is int64.
// * Accumulation is float32 (float64 for kFloat64). Outputs called "acc" below (chain terms,
//   cfm losses) and the incoming gradients `grad_terms` / `grad_loss` are float32, or
//   float64 when dtype is kFloat64; so is `logp` of flow_step.
// * Masks: `sm` (Bm, H), `dm` (Bm, D) float32; pass `sm_bstride = H` / `dm_bstride = D` when
//   Bm == B and 0 when Bm == 1.
// * Every launcher writes every element of its outputs (zeros included), returns
//   cudaSuccess without launching when there is nothing to do, and otherwise returns
//   cudaGetLastError() after the launch.
#pragma once

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

namespace flowkernels {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

enum Mode : int { kModeODE = 0, kModeSDE = 1, kModeNoise = 2 };

// flow_step_fwd: x, v, noise, std, mean, x_next are (B, H, D) of `dtype`.
// noise == nullptr draws the noise in-kernel (Philox, counter offset + linear index);
// std is read only for mode 2; x_next is not touched for mode 0 (may be nullptr).
// logp: (B,) acc (float32, float64 for kFloat64), zero for mode 0.
cudaError_t launch_flow_step_fwd(DType dtype, const void* x, const void* v, const float* t,
                                 double dt, int mode, const void* noise, const void* std_,
                                 uint64_t seed, uint64_t offset, double noise_level,
                                 const float* sm, int64_t sm_bstride, const float* dm,
                                 int64_t dm_bstride, int64_t B, int64_t H, int64_t D, void* mean,
                                 void* x_next, void* logp, cudaStream_t stream);

// chain_logprob_fwd: chain (B, K+1, H, D); v (B, Kv, H, D) with Kv == K, or Kv == 1 when
// steps != nullptr; t_grid (K+1,); std (B, K, H, D) for mode 2; steps (B,) or nullptr.
// terms: (B, K+1) acc. A sample whose steps[b] lies outside [0, K) gets a NaN row (range
// checks on the host would need a device sync).
cudaError_t launch_chain_logprob_fwd(DType dtype, const void* chain, const void* v, int64_t Kv,
                                     const float* t_grid, int mode, const void* std_,
                                     const int64_t* steps, bool include_initial,
                                     double noise_level, const float* sm, int64_t sm_bstride,
                                     const float* dm, int64_t dm_bstride, int64_t B, int64_t K,
                                     int64_t H, int64_t D, void* terms, cudaStream_t stream);

// chain_logprob_bwd: grad_terms (B, K+1) acc; grad_v of v's shape, grad_std of std's shape
// (mode 2; nullptr otherwise), both of `dtype`. An out-of-range steps[b] gives NaN gradients
// for that sample.
cudaError_t launch_chain_logprob_bwd(DType dtype, const void* grad_terms, const void* chain,
                                     const void* v, int64_t Kv, const float* t_grid, int mode,
                                     const void* std_, const int64_t* steps, double noise_level,
                                     const float* sm, int64_t sm_bstride, const float* dm,
                                     int64_t dm_bstride, int64_t B, int64_t K, int64_t H,
                                     int64_t D, void* grad_v, void* grad_std,
                                     cudaStream_t stream);

// cfm_loss_fwd: actions (B, H, D); noise, v_pred (B, N, H, D); inv_wsum (B,) float32;
// loss (B, N) acc.
cudaError_t launch_cfm_loss_fwd(DType dtype, const void* actions, const void* noise,
                                const void* v_pred, const float* sm, int64_t sm_bstride,
                                const float* dm, int64_t dm_bstride, const float* inv_wsum,
                                int64_t B, int64_t N, int64_t H, int64_t D, void* loss,
                                cudaStream_t stream);

// cfm_loss_bwd: grad_loss (B, N) acc; grad_v (B, N, H, D) of `dtype`.
cudaError_t launch_cfm_loss_bwd(DType dtype, const void* grad_loss, const void* actions,
                                const void* noise, const void* v_pred, const float* sm,
                                int64_t sm_bstride, const float* dm, int64_t dm_bstride,
                                const float* inv_wsum, int64_t B, int64_t N, int64_t H,
                                int64_t D, void* grad_v, cudaStream_t stream);

// cfm_interpolate_fwd: tau (B, N) float32; x_tau (B, N, H, D) of `dtype`.
cudaError_t launch_cfm_interpolate_fwd(DType dtype, const void* actions, const void* noise,
                                       const float* tau, int64_t B, int64_t N, int64_t H,
                                       int64_t D, void* x_tau, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// Philox4x32-10 + Box-Muller, bit-compatible with flowkernels/random.py.
//
// __host__ __device__ so that a host-only program can check them against the Python
// oracle on a machine without a GPU (device intrinsics only under __CUDA_ARCH__).
// ---------------------------------------------------------------------------------------
#define FK_HD __host__ __device__ __forceinline__

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

FK_HD uint32_t mulhi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 with key (seed_lo, seed_hi) and counter (c_lo, c_hi, 0, 0).
FK_HD void philox4x32_10(uint64_t counter, uint64_t seed, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {  // constant trip count: fully unrolled by nvcc
    const uint32_t hi0 = mulhi_u32(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mulhi_u32(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// The elementary functions below avoid logf/cosf/sqrtf on purpose: the extension is built
// with --use_fast_math, which turns those into the MUFU approximations (lg2.approx,
// cos.approx, sqrt.approx). lg2.approx has an absolute error of ~2^-22 near 1, i.e. a
// 100% relative error of ln(u0) for u0 -> 1, which would distort small normals. log1pf,
// sincospif, fmaf and the _rn intrinsics are left alone by that flag.

FK_HD float mul_rn_f32(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);  // never contracted into an FMA
#else
  return a * b;
#endif
}

FK_HD float sqrt_rn_f32(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return sqrtf(a);
#endif
}

FK_HD void sincospi_f32(float p, float* s, float* c) {
#if defined(__CUDA_ARCH__)
  sincospif(p, s, c);
#else
  const double x = 3.14159265358979323846 * static_cast<double>(p);
  *s = static_cast<float>(sin(x));
  *c = static_cast<float>(cos(x));
#endif
}

// ln(x) for normal positive x, within ~1 ulp, immune to --use_fast_math:
// x = m·2^e with m in [√½, √2), ln x = log1p(m − 1) + e·ln 2 (m − 1 is exact by Sterbenz).
FK_HD float log_f32(float x) {
  int e;
  float m = frexpf(x, &e);  // m in [0.5, 1)
  if (m < 0.70710678f) {
    m *= 2.0f;
    e -= 1;
  }
  const float ef = static_cast<float>(e);
  // ln 2 split so that ef·kLn2Hi is exact: kLn2Hi has 15 significant bits and |e| < 2^8.
  const float kLn2Hi = 6.93145752e-01f;
  const float kLn2Lo = 1.42860677e-06f;
  return fmaf(ef, kLn2Hi, fmaf(ef, kLn2Lo, log1pf(m - 1.0f)));
}

// Box-Muller on the first two Philox outputs, as the Python oracle computes it in float32:
// u0 = (2·(r0>>9)+1)·2^-24, u1 = (r1>>8)·2^-24, z = sqrt(−2 ln u0)·cos(fl(2π)·u1).
FK_HD float box_muller_f32(uint32_t r0, uint32_t r1) {
  const float kTwoM24 = 5.9604644775390625e-08f;  // 2^-24
  // Both integers are < 2^24, so the conversions and the scaling are exact.
  const float u0 = static_cast<float>(2u * (r0 >> 9) + 1u) * kTwoM24;
  const float u1 = static_cast<float>(r1 >> 8) * kTwoM24;
  const float r = sqrt_rn_f32(-2.0f * log_f32(u0));
  // The oracle evaluates cos(a) with a = fl(fl32(2π)·u1). Write a = π·(2u1) + q exactly:
  // e = fma(2π_f, u1, −a) is the rounding error of a (a = 2π_f·u1 − e) and
  // δ = 2π_f − 2π, so q = δ·u1 − e (|q| < 5e-7). Then
  // cos(a) = cospi(2u1) − q·sinpi(2u1) up to O(q²) ~ 1e-13, with 2u1 exact.
  const float kTwoPiF = 6.28318548202514648e+00f;     // fl32(2π)
  const float kTwoPiDelta = 1.74845560e-07f;  // fl32(2π) − 2π
  const float a = mul_rn_f32(kTwoPiF, u1);
  const float e = fmaf(kTwoPiF, u1, -a);
  const float q = fmaf(kTwoPiDelta, u1, -e);
  float sp, cp;
  sincospi_f32(2.0f * u1, &sp, &cp);
  const float c = fmaf(-sp, q, cp);
  return mul_rn_f32(r, c);
}

// Standard normal for 64-bit counter c = offset + linear index.
FK_HD float philox_normal_f32(uint64_t seed, uint64_t counter) {
  uint32_t r[4];
  philox4x32_10(counter, seed, r);
  return box_muller_f32(r[0], r[1]);
}

#undef FK_HD

}  // namespace cuda
}  // namespace flowkernels
