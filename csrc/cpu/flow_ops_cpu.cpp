// C++ CPU kernels of the fused flow ops (docs/kernels.md; oracle: flowkernels/ops/reference.py).
//
// Work decomposition: at::parallel_for over the independent units of each op (sample b for
// flow_step; (b, term) for chain_logprob fwd; (b, step) for its bwd; (b, n) for cfm). Every
// reduction runs inside one unit, in one thread, with a fixed order (deterministic, no atomics).
//
// Inner loops run over the flattened H·D elements of one unit with the per-unit constants (SDE
// coefficients, 1/s, log s) hoisted out and the mode resolved at compile time, so each loop body
// is branch-free straight-line code. The element weights w = sm[b,h]·dm[b,d] are expanded once
// into a flat H·D buffer (shared by all units when both masks have batch 1): with D as small as
// 7, a nested (h, d) loop leaves the vectorizer a 7-trip inner loop, while the flat loop keeps
// full vectors.
//
// Reductions use `#pragma omp simd reduction`: without it the compiler must keep the sequential
// order of a floating-point sum and will not vectorize it. The vector order is fixed at compile
// time, so results stay bit-reproducible run to run and across thread counts.
//
// dtypes: float32 / float64 / bfloat16 / float16 storage, arithmetic in at::opmath_type
// (float, or double for float64). Float64 exception to the ABI: for float64 inputs the
// chain_logprob `terms` and the cfm `loss` are returned in float64 (not float32), and
// `grad_terms` / `grad_loss` are accepted in float32 or float64, so that a float64 gradcheck
// through these kernels is exact. flow_step's `logp` stays float32 for every dtype.
#include "flow_ops.h"

#include "flow_math_cpu.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace flowkernels {
namespace {

constexpr int64_t kModeOde = 0;
constexpr int64_t kModeSde = 1;
constexpr int64_t kModeNoise = 2;
constexpr double kHalfLog2Pi = 0.91893853320467274178032973640562;

using cpu_math::kNoiseBlock;
using cpu_math::load;
using cpu_math::log_any;
using cpu_math::select;
using cpu_math::store;

// Units are grouped so that one parallel chunk holds at least this many elements: below that
// the OpenMP fork/join (a few microseconds) outweighs the work of a chunk.
constexpr int64_t kMinElementsPerChunk = 32768;

int64_t grain_for(int64_t elements_per_unit) {
  return std::max<int64_t>(1, kMinElementsPerChunk / std::max<int64_t>(1, elements_per_unit));
}

// ---------------------------------------------------------------------------------------------
// Boundary checks. Shape/device/contiguity/range problems raise ValueError, dtype problems
// TypeError; every message names the op, the tensor and what was expected.

std::string dims_str(std::initializer_list<int64_t> dims) {
  std::ostringstream os;
  os << "(";
  bool first = true;
  for (int64_t d : dims) {
    os << (first ? "" : ", ") << d;
    first = false;
  }
  os << (dims.size() == 1 ? ",)" : ")");
  return os.str();
}

void check_cpu_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name,
                    " must be on the CPU for the C++ CPU kernel, got device ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous (got shape ",
                    t.sizes(), ", strides ", t.strides(), ")");
}

void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op, const char* name,
                 const char* why) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, op, ": ", name, " must have dtype ", want, " (", why,
                   "), got ", t.scalar_type());
}

void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   op, ": ", name,
                   " must be float32, float64, bfloat16 or float16, got ", st);
}

void check_shape(const at::Tensor& t, std::initializer_list<int64_t> want, const char* op,
                 const char* name, const char* symbolic) {
  TORCH_CHECK_VALUE(t.sizes().equals(at::IntArrayRef(want)), op, ": ", name, " must have shape ",
                    symbolic, " = ", dims_str(want), ", got ", t.sizes());
}

// A required floating tensor sharing `ref`'s dtype (the call's dtype) with the given shape.
void check_same_float(const at::Tensor& t, const at::Tensor& ref, const char* ref_name,
                      std::initializer_list<int64_t> want, const char* op, const char* name,
                      const char* symbolic) {
  check_cpu_contiguous(t, op, name);
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name,
                   " must have the same dtype as ", ref_name, " (", ref.scalar_type(), "), got ",
                   t.scalar_type());
  check_shape(t, want, op, name, symbolic);
}

// float32 (Bm, L) mask with Bm in {1, B}.
void check_mask(const at::Tensor& m, int64_t B, int64_t L, const char* op, const char* name,
                const char* symbolic) {
  check_cpu_contiguous(m, op, name);
  check_dtype(m, at::kFloat, op, name, "masks are float32 weights");
  TORCH_CHECK_VALUE(m.dim() == 2 && (m.size(0) == 1 || m.size(0) == B) && m.size(1) == L, op,
                    ": ", name, " must have shape ", symbolic, " = (1 or ", B, ", ", L,
                    "), got ", m.sizes());
}

// float32 or float64 upstream gradient of the given shape.
void check_upstream_grad(const at::Tensor& g, std::initializer_list<int64_t> want, const char* op,
                         const char* name, const char* symbolic) {
  check_cpu_contiguous(g, op, name);
  TORCH_CHECK_TYPE(g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble, op, ": ",
                   name, " must be float32 (or float64), got ", g.scalar_type());
  check_shape(g, want, op, name, symbolic);
}

const at::Tensor* present(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? &*t : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Element weights w[b, h, d] = sm[b, h]·dm[b, d] as a flat (H·D) row per sample.

template <typename acc_t>
class Weights {
 public:
  Weights(const at::Tensor& sm, const at::Tensor& dm, int64_t H, int64_t D)
      : sm_(sm.data_ptr<float>()),
        dm_(dm.data_ptr<float>()),
        sm_stride_(sm.size(0) == 1 ? 0 : H),
        dm_stride_(dm.size(0) == 1 ? 0 : D),
        H_(H),
        D_(D),
        shared_(sm.size(0) == 1 && dm.size(0) == 1) {
    if (shared_) {
      shared_row_.resize(H * D);
      fill(0, shared_row_.data());
    }
  }

  // Scratch of H·D elements for rows that depend on b (one per parallel chunk).
  std::vector<acc_t> scratch() const { return std::vector<acc_t>(shared_ ? 0 : H_ * D_); }

  const acc_t* row(int64_t b, std::vector<acc_t>& scratch) const {
    if (shared_) return shared_row_.data();
    fill(b, scratch.data());
    return scratch.data();
  }

 private:
  void fill(int64_t b, acc_t* out) const {
    const float* s = sm_ + b * sm_stride_;
    const float* d = dm_ + b * dm_stride_;
    for (int64_t h = 0; h < H_; ++h) {
      const acc_t sh = static_cast<acc_t>(s[h]);
      acc_t* o = out + h * D_;
      for (int64_t j = 0; j < D_; ++j) o[j] = sh * static_cast<acc_t>(d[j]);
    }
  }

  const float* sm_;
  const float* dm_;
  int64_t sm_stride_, dm_stride_, H_, D_;
  bool shared_;
  std::vector<acc_t> shared_row_;
};

// ---------------------------------------------------------------------------------------------
// Flow-SDE transition coefficients (docs/kernels.md), in the accumulation precision and with the
// same operation order as the oracle.

template <typename acc_t>
struct SdeCoef {
  acc_t c_x, c_v, s;
};

template <typename acc_t>
SdeCoef<acc_t> sde_coefficients(acc_t t, acc_t dt, acc_t a) {
  const acc_t one = 1;
  const acc_t tn = t - dt;
  const acc_t one_minus_t_star = (t == one) ? dt : one - t;  // 1 − (1 − dt) = dt, exactly
  const acc_t sigma = a * std::sqrt(t / one_minus_t_star);
  const acc_t k = sigma * sigma * dt / (acc_t(2) * t);
  SdeCoef<acc_t> c;
  c.c_x = one - k;
  c.c_v = -(one - tn) * t + (tn - k) * (one - t);
  c.s = sigma * std::sqrt(dt);
  return c;
}

// ---------------------------------------------------------------------------------------------
// flow_step

template <typename scalar_t>
void flow_step_ode_kernel(const scalar_t* x, const scalar_t* v, double dt, int64_t numel,
                          scalar_t* mean) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t dtc = static_cast<acc_t>(dt);
  at::parallel_for(0, numel, kMinElementsPerChunk, [&](int64_t begin, int64_t end) {
    const scalar_t* __restrict__ xp = x;
    const scalar_t* __restrict__ vp = v;
    scalar_t* __restrict__ mp = mean;
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      mp[i] = store<scalar_t>(load(xp[i]) - dtc * load(vp[i]));
    }
  });
}

// One sample's block [j0, j0+n) of a stochastic step. MODE is kModeSde (per-sample coefficients
// in `c`) or kModeNoise (mean = x − dt·v, s = std per element). Returns the block's Σ w·elem.
template <int64_t MODE, typename scalar_t, typename eps_t>
at::opmath_type<scalar_t> flow_step_block(const scalar_t* __restrict__ x,
                                          const scalar_t* __restrict__ v,
                                          const eps_t* __restrict__ eps,
                                          const scalar_t* __restrict__ sd,
                                          const at::opmath_type<scalar_t>* __restrict__ w,
                                          scalar_t* __restrict__ mean_out,
                                          scalar_t* __restrict__ xn_out, int64_t n,
                                          const SdeCoef<at::opmath_type<scalar_t>>& c,
                                          at::opmath_type<scalar_t> dt) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t hl2p = static_cast<acc_t>(kHalfLog2Pi);
  const acc_t half = static_cast<acc_t>(0.5);
  acc_t sum = 0;
  if constexpr (MODE == kModeSde) {
    // s is per sample: log s and 1/s are hoisted; the caller drops the sum when s <= 0.
    const acc_t inv_s = acc_t(1) / c.s;
    const acc_t base = -std::log(c.s) - hl2p;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t m = c.c_x * load(x[j]) + c.c_v * load(v[j]);
      const scalar_t xn = store<scalar_t>(m + c.s * load(eps[j]));
      mean_out[j] = store<scalar_t>(m);
      xn_out[j] = xn;
      const acc_t z = (load(xn) - m) * inv_s;
      sum += w[j] * (base - half * z * z);
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t m = load(x[j]) - dt * load(v[j]);
      const acc_t s = load(sd[j]);
      const scalar_t xn = store<scalar_t>(m + s * load(eps[j]));
      mean_out[j] = store<scalar_t>(m);
      xn_out[j] = xn;
      const bool pos = s > acc_t(0);
      const acc_t ss = select(pos, s, acc_t(1));
      const acc_t z = (load(xn) - m) / ss;
      const acc_t elem = -log_any(ss) - hl2p - half * z * z;
      sum += select(pos, w[j] * elem, acc_t(0));
    }
  }
  return sum;
}

template <int64_t MODE, typename scalar_t, typename out_t>
void flow_step_stochastic_kernel(const scalar_t* x, const scalar_t* v, const float* t, double dt,
                                 const scalar_t* noise, const scalar_t* sd, uint64_t seed,
                                 uint64_t offset, double noise_level, const Weights<at::opmath_type<scalar_t>>& weights,
                                 int64_t B, int64_t HD, scalar_t* mean, scalar_t* x_next,
                                 out_t* logp) {
  using acc_t = at::opmath_type<scalar_t>;
  const uint32_t key0 = static_cast<uint32_t>(seed);
  const uint32_t key1 = static_cast<uint32_t>(seed >> 32);
  const acc_t dtc = static_cast<acc_t>(dt);
  at::parallel_for(0, B, grain_for(HD), [&](int64_t b0, int64_t b1) {
    auto wscratch = weights.scratch();
    std::vector<float> eps_buf(noise == nullptr ? std::min(HD, kNoiseBlock) : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t* w = weights.row(b, wscratch);
      SdeCoef<acc_t> c{acc_t(1), acc_t(0), acc_t(0)};
      bool keep = true;
      if constexpr (MODE == kModeSde) {
        c = sde_coefficients<acc_t>(static_cast<acc_t>(t[b]), dtc, static_cast<acc_t>(noise_level));
        keep = c.s > acc_t(0);
      }
      const int64_t base = b * HD;
      acc_t sum = 0;
      for (int64_t j0 = 0; j0 < HD; j0 += kNoiseBlock) {
        const int64_t n = std::min(kNoiseBlock, HD - j0);
        const int64_t o = base + j0;
        const scalar_t* sdp = (MODE == kModeNoise) ? sd + o : nullptr;
        if (noise != nullptr) {
          sum += flow_step_block<MODE>(x + o, v + o, noise + o, sdp, w + j0, mean + o, x_next + o,
                                       n, c, dtc);
        } else {
          cpu_math::philox_normal_block(offset + static_cast<uint64_t>(o), key0, key1, n, eps_buf.data());
          sum += flow_step_block<MODE>(x + o, v + o, eps_buf.data(), sdp, w + j0, mean + o,
                                       x_next + o, n, c, dtc);
        }
      }
      logp[b] = keep ? static_cast<out_t>(sum) : out_t(0);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// chain_logprob

// Σ w·(−½log 2π − ½x₀²) over one sample's initial state.
template <typename scalar_t>
at::opmath_type<scalar_t> initial_term(const scalar_t* __restrict__ x0,
                                       const at::opmath_type<scalar_t>* __restrict__ w, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t hl2p = static_cast<acc_t>(kHalfLog2Pi);
  const acc_t half = static_cast<acc_t>(0.5);
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t xv = load(x0[j]);
    sum += w[j] * (-hl2p - half * xv * xv);
  }
  return sum;
}

// Transition log-prob x_k -> x_{k+1} of one (sample, step).
template <int64_t MODE, typename scalar_t>
at::opmath_type<scalar_t> transition_term(const scalar_t* __restrict__ xk,
                                          const scalar_t* __restrict__ xn,
                                          const scalar_t* __restrict__ v,
                                          const scalar_t* __restrict__ sd,
                                          const at::opmath_type<scalar_t>* __restrict__ w,
                                          int64_t n, at::opmath_type<scalar_t> t,
                                          at::opmath_type<scalar_t> dt,
                                          at::opmath_type<scalar_t> noise_level) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t hl2p = static_cast<acc_t>(kHalfLog2Pi);
  const acc_t half = static_cast<acc_t>(0.5);
  acc_t sum = 0;
  if constexpr (MODE == kModeSde) {
    const SdeCoef<acc_t> c = sde_coefficients<acc_t>(t, dt, noise_level);
    if (!(c.s > acc_t(0))) return acc_t(0);
    const acc_t inv_s = acc_t(1) / c.s;
    const acc_t base = -std::log(c.s) - hl2p;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t m = c.c_x * load(xk[j]) + c.c_v * load(v[j]);
      const acc_t z = (load(xn[j]) - m) * inv_s;
      sum += w[j] * (base - half * z * z);
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t m = load(xk[j]) - dt * load(v[j]);
      const acc_t s = load(sd[j]);
      const bool pos = s > acc_t(0);
      const acc_t ss = select(pos, s, acc_t(1));
      const acc_t z = (load(xn[j]) - m) / ss;
      const acc_t elem = -log_any(ss) - hl2p - half * z * z;
      sum += select(pos, w[j] * elem, acc_t(0));
    }
  }
  return sum;
}

// Shapes of a chain_logprob call, after the checks.
struct ChainDims {
  int64_t B, K, H, D, Kv;
};

template <int64_t MODE, typename scalar_t, typename out_t>
void chain_fwd_kernel(const ChainDims& dims, const scalar_t* chain, const scalar_t* v,
                      const float* t_grid, const scalar_t* sd, const int64_t* steps,
                      bool include_initial, double noise_level,
                      const Weights<at::opmath_type<scalar_t>>& weights, out_t* terms) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = dims.B, K = dims.K, Kv = dims.Kv, HD = dims.H * dims.D;
  const int64_t T = K + 1;
  const acc_t a = static_cast<acc_t>(noise_level);
  at::parallel_for(0, B * T, grain_for(HD), [&](int64_t u0, int64_t u1) {
    auto wscratch = weights.scratch();
    int64_t w_b = -1;
    const acc_t* w = nullptr;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / T, term = u % T;
      const bool active = (term == 0) ? include_initial
                                      : (steps == nullptr || steps[b] == term - 1);
      acc_t val = 0;
      if (active) {
        if (b != w_b) {
          w = weights.row(b, wscratch);
          w_b = b;
        }
        const scalar_t* xb = chain + b * T * HD;
        if (term == 0) {
          val = initial_term(xb, w, HD);
        } else {
          const int64_t k = term - 1;
          const scalar_t* vk = v + (b * Kv + (Kv == K ? k : 0)) * HD;
          const scalar_t* sk = (MODE == kModeNoise) ? sd + (b * K + k) * HD : nullptr;
          const acc_t tk = static_cast<acc_t>(t_grid[k]);
          const acc_t dt = tk - static_cast<acc_t>(t_grid[k + 1]);
          val = transition_term<MODE>(xb + k * HD, xb + (k + 1) * HD, vk, sk, w, HD, tk, dt, a);
        }
      }
      terms[u] = static_cast<out_t>(val);
    }
  });
}

template <int64_t MODE, typename scalar_t>
void chain_bwd_kernel(const ChainDims& dims, const at::opmath_type<scalar_t>* g,
                      const scalar_t* chain, const scalar_t* v, const float* t_grid,
                      const scalar_t* sd, const int64_t* steps, double noise_level,
                      const Weights<at::opmath_type<scalar_t>>& weights, scalar_t* grad_v,
                      scalar_t* grad_std) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = dims.B, K = dims.K, Kv = dims.Kv, HD = dims.H * dims.D;
  const int64_t T = K + 1;
  const acc_t a = static_cast<acc_t>(noise_level);
  at::parallel_for(0, B * K, grain_for(HD), [&](int64_t u0, int64_t u1) {
    auto wscratch = weights.scratch();
    int64_t w_b = -1;
    const acc_t* w = nullptr;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / K, k = u % K;
      const bool active = steps == nullptr || steps[b] == k;
      const int64_t vslice = b * Kv + (Kv == K ? k : 0);
      scalar_t* __restrict__ gv = grad_v + vslice * HD;
      scalar_t* __restrict__ gs = (MODE == kModeNoise) ? grad_std + (b * K + k) * HD : nullptr;
      if (!active) {
        // Inactive steps get zero gradients; with a one-step v its single slice belongs to the
        // active step, which writes it.
        if (Kv == K) std::fill(gv, gv + HD, static_cast<scalar_t>(0));
        if (MODE == kModeNoise) std::fill(gs, gs + HD, static_cast<scalar_t>(0));
        continue;
      }
      if (b != w_b) {
        w = weights.row(b, wscratch);
        w_b = b;
      }
      const scalar_t* __restrict__ xk = chain + (b * T + k) * HD;
      const scalar_t* __restrict__ xn = xk + HD;
      const scalar_t* __restrict__ vk = v + vslice * HD;
      const acc_t gk = g[b * T + k + 1];
      const acc_t tk = static_cast<acc_t>(t_grid[k]);
      const acc_t dt = tk - static_cast<acc_t>(t_grid[k + 1]);
      if constexpr (MODE == kModeSde) {
        const SdeCoef<acc_t> c = sde_coefficients<acc_t>(tk, dt, a);
        if (!(c.s > acc_t(0))) {
          std::fill(gv, gv + HD, static_cast<scalar_t>(0));
          continue;
        }
        // g·w·(z/s)·c_v with z = (x_{k+1} − mean)/s: one per-unit factor g·c_v/s².
        const acc_t inv_s = acc_t(1) / c.s;
        const acc_t f = gk * inv_s * inv_s * c.c_v;
#pragma omp simd
        for (int64_t j = 0; j < HD; ++j) {
          const acc_t m = c.c_x * load(xk[j]) + c.c_v * load(vk[j]);
          gv[j] = store<scalar_t>(f * w[j] * (load(xn[j]) - m));
        }
      } else {
        const scalar_t* __restrict__ sk = sd + (b * K + k) * HD;
        const acc_t neg_dt = -dt;
#pragma omp simd
        for (int64_t j = 0; j < HD; ++j) {
          const acc_t m = load(xk[j]) - dt * load(vk[j]);
          const acc_t s = load(sk[j]);
          const bool pos = s > acc_t(0);
          const acc_t inv_s = acc_t(1) / select(pos, s, acc_t(1));
          const acc_t z = (load(xn[j]) - m) * inv_s;
          const acc_t gw = gk * w[j];
          gv[j] = store<scalar_t>(select(pos, gw * z * inv_s * neg_dt, acc_t(0)));
          gs[j] = store<scalar_t>(select(pos, gw * (z * z - acc_t(1)) * inv_s, acc_t(0)));
        }
      }
    }
  });
}

// Reads a float32/float64 upstream gradient in the accumulation precision (it is tiny).
template <typename acc_t>
at::Tensor upstream_as(const at::Tensor& g) {
  return g.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

// ---------------------------------------------------------------------------------------------
// cfm

// Shapes of a cfm call, after the checks.
struct CfmDims {
  int64_t B, N, H, D;
};

template <typename scalar_t, typename out_t>
void cfm_loss_fwd_kernel(const CfmDims& d, const scalar_t* A, const scalar_t* E, const scalar_t* V,
                         const float* inv_wsum, const Weights<at::opmath_type<scalar_t>>& weights,
                         out_t* loss) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HD = d.H * d.D, N = d.N;
  // Units (b, n) are consecutive in n, so a chunk reads A[b] from memory once and from cache
  // N − 1 times.
  at::parallel_for(0, d.B * N, grain_for(HD), [&](int64_t u0, int64_t u1) {
    auto wscratch = weights.scratch();
    int64_t w_b = -1;
    const acc_t* w = nullptr;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / N;
      if (b != w_b) {
        w = weights.row(b, wscratch);
        w_b = b;
      }
      const scalar_t* __restrict__ a = A + b * HD;
      const scalar_t* __restrict__ e = E + u * HD;
      const scalar_t* __restrict__ vp = V + u * HD;
      const acc_t* __restrict__ wr = w;
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < HD; ++j) {
        const acc_t diff =
            load(vp[j]) - (load(e[j]) - load(a[j]));
        sum += wr[j] * diff * diff;
      }
      loss[u] = static_cast<out_t>(sum * static_cast<acc_t>(inv_wsum[b]));
    }
  });
}

template <typename scalar_t>
void cfm_loss_bwd_kernel(const CfmDims& d, const at::opmath_type<scalar_t>* g, const scalar_t* A,
                         const scalar_t* E, const scalar_t* V, const float* inv_wsum,
                         const Weights<at::opmath_type<scalar_t>>& weights, scalar_t* grad_v) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HD = d.H * d.D, N = d.N;
  at::parallel_for(0, d.B * N, grain_for(HD), [&](int64_t u0, int64_t u1) {
    auto wscratch = weights.scratch();
    int64_t w_b = -1;
    const acc_t* w = nullptr;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / N;
      if (b != w_b) {
        w = weights.row(b, wscratch);
        w_b = b;
      }
      const scalar_t* __restrict__ a = A + b * HD;
      const scalar_t* __restrict__ e = E + u * HD;
      const scalar_t* __restrict__ vp = V + u * HD;
      const acc_t* __restrict__ wr = w;
      scalar_t* __restrict__ o = grad_v + u * HD;
      const acc_t scale = acc_t(2) * g[u] * static_cast<acc_t>(inv_wsum[b]);
#pragma omp simd
      for (int64_t j = 0; j < HD; ++j) {
        const acc_t diff =
            load(vp[j]) - (load(e[j]) - load(a[j]));
        o[j] = store<scalar_t>(scale * wr[j] * diff);
      }
    }
  });
}

template <typename scalar_t>
void cfm_interpolate_kernel(const CfmDims& d, const scalar_t* A, const scalar_t* E,
                            const float* tau, scalar_t* x_tau) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HD = d.H * d.D, N = d.N;
  at::parallel_for(0, d.B * N, grain_for(HD), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const scalar_t* __restrict__ a = A + (u / N) * HD;
      const scalar_t* __restrict__ e = E + u * HD;
      scalar_t* __restrict__ o = x_tau + u * HD;
      const acc_t tv = static_cast<acc_t>(tau[u]);
      const acc_t one_minus = acc_t(1) - tv;
#pragma omp simd
      for (int64_t j = 0; j < HD; ++j) {
        o[j] = store<scalar_t>(tv * load(e[j]) +
                                     one_minus * load(a[j]));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Argument validation shared by chain_logprob fwd/bwd.

ChainDims check_chain_args(const char* op, const at::Tensor& chain, const at::Tensor& v,
                           const at::Tensor& t_grid, int64_t mode, const at::Tensor* sd,
                           const at::Tensor* steps, double noise_level, const at::Tensor& sm,
                           const at::Tensor& dm) {
  check_cpu_contiguous(chain, op, "chain");
  check_float_dtype(chain, op, "chain");
  TORCH_CHECK_VALUE(chain.dim() == 4 && chain.size(1) >= 1, op,
                    ": chain must have shape (B, K+1, H, D) with K+1 >= 1, got ", chain.sizes());
  ChainDims d{chain.size(0), chain.size(1) - 1, chain.size(2), chain.size(3), 0};
  TORCH_CHECK_VALUE(mode == kModeSde || mode == kModeNoise, op, ": mode must be 1 (sde) or 2 (noise), got ",
                    mode);
  check_cpu_contiguous(v, op, "v");
  TORCH_CHECK_TYPE(v.scalar_type() == chain.scalar_type(), op,
                   ": v must have the same dtype as chain (", chain.scalar_type(), "), got ",
                   v.scalar_type());
  const bool v_ok = v.dim() == 4 && v.size(0) == d.B && v.size(2) == d.H && v.size(3) == d.D &&
                    (v.size(1) == d.K || (steps != nullptr && v.size(1) == 1));
  TORCH_CHECK_VALUE(v_ok, op, ": v must have shape (B, K, H, D) = ",
                    dims_str({d.B, d.K, d.H, d.D}), " or (B, 1, H, D) with steps, got ", v.sizes());
  d.Kv = v.size(1);
  check_cpu_contiguous(t_grid, op, "t_grid");
  check_dtype(t_grid, at::kFloat, op, "t_grid", "time grids are float32");
  check_shape(t_grid, {d.K + 1}, op, "t_grid", "(K+1,)");
  if (mode == kModeNoise) {
    TORCH_CHECK_VALUE(sd != nullptr, op, ": std is required for mode 2 (noise)");
    check_same_float(*sd, chain, "chain", {d.B, d.K, d.H, d.D}, op, "std", "(B, K, H, D)");
  } else {
    TORCH_CHECK_VALUE(sd == nullptr, op, ": std must be None unless mode is 2 (noise), got mode ",
                      mode);
    TORCH_CHECK_VALUE(std::isfinite(noise_level) && noise_level >= 0.0, op,
                      ": noise_level must be finite and >= 0, got ", noise_level);
  }
  if (steps != nullptr) {
    check_cpu_contiguous(*steps, op, "steps");
    check_dtype(*steps, at::kLong, op, "steps", "step indices are int64");
    check_shape(*steps, {d.B}, op, "steps", "(B,)");
    const int64_t* s = steps->data_ptr<int64_t>();
    for (int64_t b = 0; b < d.B; ++b) {
      TORCH_CHECK_VALUE(s[b] >= 0 && s[b] < d.K, op, ": steps[", b, "] = ", s[b],
                        " is out of range [0, K) = [0, ", d.K, ")");
    }
  }
  check_mask(sm, d.B, d.H, op, "sm", "(Bm, H)");
  check_mask(dm, d.B, d.D, op, "dm", "(Bm, D)");
  return d;
}

CfmDims check_cfm_args(const char* op, const at::Tensor& actions, const at::Tensor& noise,
                       const at::Tensor* v_pred) {
  check_cpu_contiguous(actions, op, "actions");
  check_float_dtype(actions, op, "actions");
  TORCH_CHECK_VALUE(actions.dim() == 3, op, ": actions must have shape (B, H, D), got ",
                    actions.sizes());
  const int64_t B = actions.size(0), H = actions.size(1), D = actions.size(2);
  check_cpu_contiguous(noise, op, "noise");
  TORCH_CHECK_TYPE(noise.scalar_type() == actions.scalar_type(), op,
                   ": noise must have the same dtype as actions (", actions.scalar_type(),
                   "), got ", noise.scalar_type());
  TORCH_CHECK_VALUE(noise.dim() == 4 && noise.size(0) == B && noise.size(2) == H &&
                        noise.size(3) == D,
                    op, ": noise must have shape (B, N, H, D) = (", B, ", N, ", H, ", ", D,
                    "), got ", noise.sizes());
  const int64_t N = noise.size(1);
  if (v_pred != nullptr) {
    check_same_float(*v_pred, actions, "actions", {B, N, H, D}, op, "v_pred", "(B, N, H, D)");
  }
  return {B, N, H, D};
}

void check_cfm_masks(const char* op, const CfmDims& d, const at::Tensor& sm, const at::Tensor& dm,
                     const at::Tensor& inv_wsum) {
  check_mask(sm, d.B, d.H, op, "sm", "(Bm, H)");
  check_mask(dm, d.B, d.D, op, "dm", "(Bm, D)");
  check_cpu_contiguous(inv_wsum, op, "inv_wsum");
  check_dtype(inv_wsum, at::kFloat, op, "inv_wsum", "per-sample normalizers are float32");
  check_shape(inv_wsum, {d.B}, op, "inv_wsum", "(B,)");
}

at::ScalarType loss_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

// =============================================================================================
// Entry points

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_step_fwd_cpu(
    const at::Tensor& x, const at::Tensor& v, const at::Tensor& t, double dt, int64_t mode,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& std_, int64_t seed,
    int64_t offset, double noise_level, const at::Tensor& sm, const at::Tensor& dm) {
  constexpr const char* op = "flow_step";
  check_cpu_contiguous(x, op, "x");
  check_float_dtype(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must have shape (B, H, D), got ", x.sizes());
  const int64_t B = x.size(0), H = x.size(1), D = x.size(2);
  check_same_float(v, x, "x", {B, H, D}, op, "v", "(B, H, D)");
  check_cpu_contiguous(t, op, "t");
  check_dtype(t, at::kFloat, op, "t", "times are float32");
  check_shape(t, {B}, op, "t", "(B,)");
  TORCH_CHECK_VALUE(mode == kModeOde || mode == kModeSde || mode == kModeNoise, op,
                    ": mode must be 0 (ode), 1 (sde) or 2 (noise), got ", mode);
  TORCH_CHECK_VALUE(std::isfinite(dt) && dt > 0.0, op, ": dt must be finite and > 0, got ", dt);
  const at::Tensor* noise_t = present(noise);
  const at::Tensor* std_t = present(std_);
  if (noise_t != nullptr) check_same_float(*noise_t, x, "x", {B, H, D}, op, "noise", "(B, H, D)");
  if (mode == kModeNoise) {
    TORCH_CHECK_VALUE(std_t != nullptr, op, ": std is required for mode 2 (noise)");
    check_same_float(*std_t, x, "x", {B, H, D}, op, "std", "(B, H, D)");
  } else {
    TORCH_CHECK_VALUE(std_t == nullptr, op, ": std must be None unless mode is 2 (noise), got mode ",
                      mode);
  }
  if (mode == kModeSde) {
    TORCH_CHECK_VALUE(std::isfinite(noise_level) && noise_level >= 0.0, op,
                      ": noise_level must be finite and >= 0, got ", noise_level);
  }
  TORCH_CHECK_VALUE(seed >= 0, op, ": seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK_VALUE(offset >= 0 && offset < (int64_t{1} << 62), op,
                    ": offset must be in [0, 2**62), got ", offset);
  check_mask(sm, B, H, op, "sm", "(Bm, H)");
  check_mask(dm, B, D, op, "dm", "(Bm, D)");

  const int64_t HD = H * D;
  at::Tensor mean = at::empty_like(x);
  at::Tensor logp = at::zeros({B}, x.options().dtype(loss_dtype(x.scalar_type())));
  if (mode == kModeOde) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flow_step_fwd_cpu", [&] {
      flow_step_ode_kernel<scalar_t>(x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), dt, B * HD,
                                     mean.data_ptr<scalar_t>());
    });
    return {mean, at::empty({0}, x.options()), logp};
  }
  at::Tensor x_next = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flow_step_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Weights<acc_t> weights(sm, dm, H, D);
    const scalar_t* np = noise_t != nullptr ? noise_t->data_ptr<scalar_t>() : nullptr;
    const scalar_t* sp = std_t != nullptr ? std_t->data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto mode_tag) {
      constexpr int64_t M = decltype(mode_tag)::value;
      flow_step_stochastic_kernel<M, scalar_t, out_t>(
          x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), t.data_ptr<float>(), dt, np, sp,
          static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), noise_level, weights, B, HD,
          mean.data_ptr<scalar_t>(), x_next.data_ptr<scalar_t>(), logp.data_ptr<out_t>());
    };
    if (mode == kModeSde) {
      run(std::integral_constant<int64_t, kModeSde>{});
    } else {
      run(std::integral_constant<int64_t, kModeNoise>{});
    }
  });
  return {mean, x_next, logp};
}

at::Tensor chain_logprob_fwd_cpu(const at::Tensor& chain, const at::Tensor& v,
                                 const at::Tensor& t_grid, int64_t mode,
                                 const std::optional<at::Tensor>& std_,
                                 const std::optional<at::Tensor>& steps, bool include_initial,
                                 double noise_level, const at::Tensor& sm, const at::Tensor& dm) {
  constexpr const char* op = "chain_logprob";
  const at::Tensor* sd = present(std_);
  const at::Tensor* st = present(steps);
  const ChainDims d = check_chain_args(op, chain, v, t_grid, mode, sd, st, noise_level, sm, dm);
  at::Tensor terms = at::empty({d.B, d.K + 1}, chain.options().dtype(loss_dtype(chain.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, chain.scalar_type(), "chain_logprob_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Weights<acc_t> weights(sm, dm, d.H, d.D);
    const scalar_t* sp = sd != nullptr ? sd->data_ptr<scalar_t>() : nullptr;
    const int64_t* stp = st != nullptr ? st->data_ptr<int64_t>() : nullptr;
    auto run = [&](auto mode_tag) {
      constexpr int64_t M = decltype(mode_tag)::value;
      chain_fwd_kernel<M, scalar_t, out_t>(d, chain.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                           t_grid.data_ptr<float>(), sp, stp, include_initial,
                                           noise_level, weights, terms.data_ptr<out_t>());
    };
    if (mode == kModeSde) {
      run(std::integral_constant<int64_t, kModeSde>{});
    } else {
      run(std::integral_constant<int64_t, kModeNoise>{});
    }
  });
  return terms;
}

std::tuple<at::Tensor, std::optional<at::Tensor>> chain_logprob_bwd_cpu(
    const at::Tensor& grad_terms, const at::Tensor& chain, const at::Tensor& v,
    const at::Tensor& t_grid, int64_t mode, const std::optional<at::Tensor>& std_,
    const std::optional<at::Tensor>& steps, double noise_level, const at::Tensor& sm,
    const at::Tensor& dm) {
  constexpr const char* op = "chain_logprob_bwd";
  const at::Tensor* sd = present(std_);
  const at::Tensor* st = present(steps);
  const ChainDims d = check_chain_args(op, chain, v, t_grid, mode, sd, st, noise_level, sm, dm);
  check_upstream_grad(grad_terms, {d.B, d.K + 1}, op, "grad_terms", "(B, K+1)");
  at::Tensor grad_v = at::empty_like(v);
  std::optional<at::Tensor> grad_std;
  if (sd != nullptr) grad_std = at::empty_like(*sd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, chain.scalar_type(), "chain_logprob_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Weights<acc_t> weights(sm, dm, d.H, d.D);
    const at::Tensor g = upstream_as<acc_t>(grad_terms);
    const scalar_t* sp = sd != nullptr ? sd->data_ptr<scalar_t>() : nullptr;
    scalar_t* gsp = grad_std.has_value() ? grad_std->data_ptr<scalar_t>() : nullptr;
    const int64_t* stp = st != nullptr ? st->data_ptr<int64_t>() : nullptr;
    auto run = [&](auto mode_tag) {
      constexpr int64_t M = decltype(mode_tag)::value;
      chain_bwd_kernel<M, scalar_t>(d, g.data_ptr<acc_t>(), chain.data_ptr<scalar_t>(),
                                    v.data_ptr<scalar_t>(), t_grid.data_ptr<float>(), sp, stp,
                                    noise_level, weights, grad_v.data_ptr<scalar_t>(), gsp);
    };
    if (mode == kModeSde) {
      run(std::integral_constant<int64_t, kModeSde>{});
    } else {
      run(std::integral_constant<int64_t, kModeNoise>{});
    }
  });
  return {grad_v, grad_std};
}

at::Tensor cfm_loss_fwd_cpu(const at::Tensor& actions, const at::Tensor& noise,
                            const at::Tensor& v_pred, const at::Tensor& sm, const at::Tensor& dm,
                            const at::Tensor& inv_wsum) {
  constexpr const char* op = "cfm_loss";
  const CfmDims d = check_cfm_args(op, actions, noise, &v_pred);
  check_cfm_masks(op, d, sm, dm, inv_wsum);
  at::Tensor loss = at::empty({d.B, d.N}, actions.options().dtype(loss_dtype(actions.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, actions.scalar_type(), "cfm_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Weights<acc_t> weights(sm, dm, d.H, d.D);
    cfm_loss_fwd_kernel<scalar_t, out_t>(d, actions.data_ptr<scalar_t>(), noise.data_ptr<scalar_t>(),
                                         v_pred.data_ptr<scalar_t>(), inv_wsum.data_ptr<float>(),
                                         weights, loss.data_ptr<out_t>());
  });
  return loss;
}

at::Tensor cfm_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& actions,
                            const at::Tensor& noise, const at::Tensor& v_pred,
                            const at::Tensor& sm, const at::Tensor& dm,
                            const at::Tensor& inv_wsum) {
  constexpr const char* op = "cfm_loss_bwd";
  const CfmDims d = check_cfm_args(op, actions, noise, &v_pred);
  check_cfm_masks(op, d, sm, dm, inv_wsum);
  check_upstream_grad(grad_loss, {d.B, d.N}, op, "grad_loss", "(B, N)");
  at::Tensor grad_v = at::empty_like(v_pred);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, actions.scalar_type(), "cfm_loss_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Weights<acc_t> weights(sm, dm, d.H, d.D);
    const at::Tensor g = upstream_as<acc_t>(grad_loss);
    cfm_loss_bwd_kernel<scalar_t>(d, g.data_ptr<acc_t>(), actions.data_ptr<scalar_t>(),
                                  noise.data_ptr<scalar_t>(), v_pred.data_ptr<scalar_t>(),
                                  inv_wsum.data_ptr<float>(), weights, grad_v.data_ptr<scalar_t>());
  });
  return grad_v;
}

at::Tensor cfm_interpolate_fwd_cpu(const at::Tensor& actions, const at::Tensor& noise,
                                   const at::Tensor& tau) {
  constexpr const char* op = "cfm_interpolate";
  const CfmDims d = check_cfm_args(op, actions, noise, nullptr);
  check_cpu_contiguous(tau, op, "tau");
  check_dtype(tau, at::kFloat, op, "tau", "times are float32");
  check_shape(tau, {d.B, d.N}, op, "tau", "(B, N)");
  at::Tensor x_tau = at::empty_like(noise);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, actions.scalar_type(), "cfm_interpolate_fwd_cpu", [&] {
    cfm_interpolate_kernel<scalar_t>(d, actions.data_ptr<scalar_t>(), noise.data_ptr<scalar_t>(),
                                     tau.data_ptr<float>(), x_tau.data_ptr<scalar_t>());
  });
  return x_tau;
}

}  // namespace flowkernels
