// Host entry points of the CUDA backend (`*_cuda` in flowkernels._C, see docs/kernels.md).
//
// Validates the kernel ABI at the boundary (TORCH_CHECK_VALUE -> ValueError for shapes,
// devices, contiguity and ranges; TORCH_CHECK_TYPE -> TypeError for dtypes), allocates the
// outputs, and calls the raw-pointer launchers of flow_kernels.cu on the current stream of
// the inputs' device.
//
// Not checked here: the values of `steps` (0 <= steps[b] < K). Reading them would need a
// device-to-host copy and a stream sync on every call; instead the kernels turn an
// out-of-range step into NaN terms / gradients for that sample (never an out-of-bounds
// access).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "flow_ops.h"
#include "flow_kernels.cuh"

namespace flowkernels {

namespace {

using cuda::DType;

// ---------------------------------------------------------------------------------------
// Validation helpers. Every message starts with the function name and names the tensor.
// ---------------------------------------------------------------------------------------

bool is_float_dtype(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

DType to_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, "flowkernels CUDA: unsupported dtype ", st);
  return DType::kFloat32;  // unreachable
}

// Accumulation dtype, also the dtype of chain terms / cfm losses and of their gradients:
// float64 for float64 inputs (fp64 gradcheck), float32 otherwise.
at::ScalarType acc_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// The first floating tensor fixes the dtype and the device of the call.
void check_main(const at::Tensor& t, const char* fn, const char* name, int64_t dim,
                const char* dims) {
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), fn, ": ", name,
                   " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_cuda(), fn, ": ", name, " must be a CUDA tensor, got device ",
                    t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), fn, ": ", name, " must be contiguous");
  TORCH_CHECK_VALUE(t.dim() == dim, fn, ": ", name, " must have shape ", dims, ", got ",
                    t.sizes());
}

void check_device(const at::Tensor& t, const at::Device& device, const char* fn,
                  const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == device, fn, ": ", name, " must be on ", device,
                    " like the other inputs, got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* fn, const char* name,
                 const char* why) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, fn, ": ", name, " must be ", expected, " (", why,
                   "), got ", t.scalar_type());
}

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* fn, const char* name,
                 const char* dims) {
  TORCH_CHECK_VALUE(t.sizes() == expected, fn, ": ", name, " must have shape ", dims, " = ",
                    expected, ", got ", t.sizes());
}

// A floating input of the call's dtype, on its device, of the given shape.
void check_like(const at::Tensor& t, const at::Tensor& main, const char* main_name,
                at::IntArrayRef expected, const char* fn, const char* name, const char* dims) {
  TORCH_CHECK_TYPE(t.scalar_type() == main.scalar_type(), fn, ": ", name, " must have the dtype of ",
                   main_name, " (", main.scalar_type(), "), got ", t.scalar_type());
  check_device(t, main.device(), fn, name);
  check_shape(t, expected, fn, name, dims);
}

// float32 auxiliary input (t, t_grid, tau, inv_wsum).
void check_f32(const at::Tensor& t, const at::Device& device, at::IntArrayRef expected,
               const char* fn, const char* name, const char* dims) {
  check_dtype(t, at::kFloat, fn, name, "the kernel ABI");
  check_device(t, device, fn, name);
  check_shape(t, expected, fn, name, dims);
}

// Gradient of an accumulation-dtype output. float32 for float32/16/bf16 inputs; for float64
// inputs float64 (float32 is accepted and widened).
at::Tensor check_grad(const at::Tensor& g, at::ScalarType input_dtype, const at::Device& device,
                      at::IntArrayRef expected, const char* fn, const char* name,
                      const char* dims) {
  const at::ScalarType acc = acc_dtype(input_dtype);
  const bool ok = g.scalar_type() == acc || (acc == at::kDouble && g.scalar_type() == at::kFloat);
  TORCH_CHECK_TYPE(ok, fn, ": ", name, " must be ", acc, " for ", input_dtype, " inputs, got ",
                   g.scalar_type());
  check_device(g, device, fn, name);
  check_shape(g, expected, fn, name, dims);
  return g.scalar_type() == acc ? g : g.to(acc);
}

struct Mask {
  const float* data;
  int64_t bstride;  // 0 for a mask shared by the batch (Bm == 1)
};

// sm (Bm, H) / dm (Bm, D), float32, Bm in {1, B}.
Mask check_mask(const at::Tensor& m, int64_t B, int64_t L, const at::Device& device,
                const char* fn, const char* name, const char* len_name) {
  check_dtype(m, at::kFloat, fn, name, "normalized mask weights");
  check_device(m, device, fn, name);
  TORCH_CHECK_VALUE(m.dim() == 2 && (m.size(0) == 1 || m.size(0) == B) && m.size(1) == L, fn, ": ",
                    name, " must have shape (Bm, ", len_name, ") with Bm in {1, B}, B = ", B, ", ",
                    len_name, " = ", L, ", got ", m.sizes());
  return {m.data_ptr<float>(), m.size(0) == 1 ? 0 : L};
}

void check_row(int64_t H, int64_t D, const char* fn) {
  TORCH_CHECK_VALUE(H == 0 || D <= std::numeric_limits<int32_t>::max() / H, fn,
                    ": H·D must be below 2^31 (one sample is indexed in 32 bits), got H = ", H,
                    ", D = ", D);
}

void check_noise_level(double noise_level, const char* fn) {
  TORCH_CHECK_VALUE(std::isfinite(noise_level) && noise_level >= 0.0, fn,
                    ": noise_level must be a finite number >= 0, got ", noise_level);
}

void check_std_given(const std::optional<at::Tensor>& std_, int64_t mode, const char* fn) {
  TORCH_CHECK_VALUE(std_.has_value() == (mode == cuda::kModeNoise), fn,
                    ": std must be given for mode 2 (noise) and only then; got ",
                    std_.has_value() ? "a tensor" : "None", " with mode ", mode);
}

// steps: int64 (B,) on the device. Its values are not read here (see the file comment).
void check_steps(const std::optional<at::Tensor>& steps, int64_t B, int64_t K,
                 const at::Device& device, const char* fn) {
  if (!steps.has_value()) return;
  check_dtype(*steps, at::kLong, fn, "steps", "step indices");
  check_device(*steps, device, fn, "steps");
  check_shape(*steps, {B}, fn, "steps", "(B,)");
  TORCH_CHECK_VALUE(K >= 1, fn, ": steps given but the chain has no transition (K = 0)");
}

void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "flowkernels: CUDA kernel ", kernel, " failed: ",
              cudaGetErrorString(err));
}

const void* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

// Shapes and checks shared by chain_logprob fwd and bwd. Returns (K, Kv).
std::pair<int64_t, int64_t> check_chain_args(const at::Tensor& chain, const at::Tensor& v,
                                             const at::Tensor& t_grid, int64_t mode,
                                             const std::optional<at::Tensor>& std_,
                                             const std::optional<at::Tensor>& steps,
                                             double noise_level, const char* fn) {
  TORCH_CHECK_VALUE(mode == cuda::kModeSDE || mode == cuda::kModeNoise, fn,
                    ": mode must be 1 (sde) or 2 (noise), got ", mode);
  check_main(chain, fn, "chain", 4, "(B, K+1, H, D)");
  const int64_t B = chain.size(0), K = chain.size(1) - 1, H = chain.size(2), D = chain.size(3);
  TORCH_CHECK_VALUE(K >= 0, fn, ": chain must have shape (B, K+1, H, D) with K+1 >= 1, got ",
                    chain.sizes());
  check_row(H, D, fn);
  TORCH_CHECK_VALUE(v.dim() == 4, fn, ": v must have shape (B, K, H, D), got ", v.sizes());
  const int64_t Kv = v.size(1);
  if (steps.has_value()) {
    TORCH_CHECK_VALUE(Kv == K || Kv == 1, fn,
                      ": with steps, v must have shape (B, K, H, D) or (B, 1, H, D), K = ", K,
                      ", got ", v.sizes());
  }
  check_like(v, chain, "chain", {B, Kv, H, D}, fn, "v",
             steps.has_value() ? "(B, K or 1, H, D)" : "(B, K, H, D)");
  if (!steps.has_value()) check_shape(v, {B, K, H, D}, fn, "v", "(B, K, H, D)");
  check_f32(t_grid, chain.device(), {K + 1}, fn, "t_grid", "(K+1,)");
  check_std_given(std_, mode, fn);
  if (std_.has_value()) check_like(*std_, chain, "chain", {B, K, H, D}, fn, "std", "(B, K, H, D)");
  check_steps(steps, B, K, chain.device(), fn);
  check_noise_level(noise_level, fn);
  return {K, Kv};
}

}  // namespace

// ---------------------------------------------------------------------------------------
// flow_step_fwd
// ---------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_step_fwd_cuda(
    const at::Tensor& x, const at::Tensor& v, const at::Tensor& t, double dt, int64_t mode,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& std_, int64_t seed,
    int64_t offset, double noise_level, const at::Tensor& sm, const at::Tensor& dm) {
  const char* fn = "flow_step_fwd_cuda";
  TORCH_CHECK_VALUE(mode >= cuda::kModeODE && mode <= cuda::kModeNoise, fn,
                    ": mode must be 0 (ode), 1 (sde) or 2 (noise), got ", mode);
  check_main(x, fn, "x", 3, "(B, H, D)");
  const int64_t B = x.size(0), H = x.size(1), D = x.size(2);
  check_row(H, D, fn);
  const at::Device device = x.device();
  check_like(v, x, "x", {B, H, D}, fn, "v", "(B, H, D)");
  check_f32(t, device, {B}, fn, "t", "(B,)");
  TORCH_CHECK_VALUE(std::isfinite(dt) && dt > 0.0, fn, ": dt must be a finite number > 0, got ",
                    dt);
  if (noise.has_value()) check_like(*noise, x, "x", {B, H, D}, fn, "noise", "(B, H, D)");
  check_std_given(std_, mode, fn);
  if (std_.has_value()) check_like(*std_, x, "x", {B, H, D}, fn, "std", "(B, H, D)");
  TORCH_CHECK_VALUE(seed >= 0, fn, ": seed must be in [0, 2^63), got ", seed);
  TORCH_CHECK_VALUE(offset >= 0 && offset < (int64_t(1) << 62), fn,
                    ": offset must be in [0, 2^62), got ", offset);
  check_noise_level(noise_level, fn);
  const Mask smk = check_mask(sm, B, H, device, fn, "sm", "H");
  const Mask dmk = check_mask(dm, B, D, device, fn, "dm", "D");

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor mean = at::empty(x.sizes(), x.options());
  at::Tensor x_next =
      mode == cuda::kModeODE ? at::empty({0}, x.options()) : at::empty(x.sizes(), x.options());
  at::Tensor logp = at::empty({B}, x.options().dtype(acc_dtype(x.scalar_type())));  // kernel-written
  const cudaError_t err = cuda::launch_flow_step_fwd(
      to_dtype(x.scalar_type()), x.data_ptr(), v.data_ptr(), t.data_ptr<float>(), dt,
      static_cast<int>(mode), opt_ptr(noise), opt_ptr(std_), static_cast<uint64_t>(seed),
      static_cast<uint64_t>(offset), noise_level, smk.data, smk.bstride, dmk.data, dmk.bstride, B,
      H, D, mean.data_ptr(), mode == cuda::kModeODE ? nullptr : x_next.data_ptr(),
      logp.data_ptr(), c10::cuda::getCurrentCUDAStream(device.index()).stream());
  check_launch(err, "flow_step_fwd");
  return {mean, x_next, logp};
}

// ---------------------------------------------------------------------------------------
// chain_logprob
// ---------------------------------------------------------------------------------------
at::Tensor chain_logprob_fwd_cuda(const at::Tensor& chain, const at::Tensor& v,
                                  const at::Tensor& t_grid, int64_t mode,
                                  const std::optional<at::Tensor>& std_,
                                  const std::optional<at::Tensor>& steps, bool include_initial,
                                  double noise_level, const at::Tensor& sm, const at::Tensor& dm) {
  const char* fn = "chain_logprob_fwd_cuda";
  const auto [K, Kv] = check_chain_args(chain, v, t_grid, mode, std_, steps, noise_level, fn);
  const int64_t B = chain.size(0), H = chain.size(2), D = chain.size(3);
  const at::Device device = chain.device();
  const Mask smk = check_mask(sm, B, H, device, fn, "sm", "H");
  const Mask dmk = check_mask(dm, B, D, device, fn, "dm", "D");

  const c10::cuda::CUDAGuard guard(device);
  // Every element is written by the kernel (zeros for unselected or skipped terms).
  at::Tensor terms = at::empty({B, K + 1}, chain.options().dtype(acc_dtype(chain.scalar_type())));
  const cudaError_t err = cuda::launch_chain_logprob_fwd(
      to_dtype(chain.scalar_type()), chain.data_ptr(), v.data_ptr(), Kv,
      t_grid.data_ptr<float>(), static_cast<int>(mode), opt_ptr(std_),
      steps.has_value() ? steps->data_ptr<int64_t>() : nullptr, include_initial, noise_level,
      smk.data, smk.bstride, dmk.data, dmk.bstride, B, K, H, D, terms.data_ptr(),
      c10::cuda::getCurrentCUDAStream(device.index()).stream());
  check_launch(err, "chain_logprob_fwd");
  return terms;
}

std::tuple<at::Tensor, std::optional<at::Tensor>> chain_logprob_bwd_cuda(
    const at::Tensor& grad_terms, const at::Tensor& chain, const at::Tensor& v,
    const at::Tensor& t_grid, int64_t mode, const std::optional<at::Tensor>& std_,
    const std::optional<at::Tensor>& steps, double noise_level, const at::Tensor& sm,
    const at::Tensor& dm) {
  const char* fn = "chain_logprob_bwd_cuda";
  const auto [K, Kv] = check_chain_args(chain, v, t_grid, mode, std_, steps, noise_level, fn);
  const int64_t B = chain.size(0), H = chain.size(2), D = chain.size(3);
  const at::Device device = chain.device();
  const at::Tensor g = check_grad(grad_terms, chain.scalar_type(), device, {B, K + 1}, fn,
                                  "grad_terms", "(B, K+1)");
  const Mask smk = check_mask(sm, B, H, device, fn, "sm", "H");
  const Mask dmk = check_mask(dm, B, D, device, fn, "dm", "D");

  const c10::cuda::CUDAGuard guard(device);
  // Every element is written by the kernel, the zero slices of a `steps` call included.
  at::Tensor grad_v = at::empty(v.sizes(), v.options());
  std::optional<at::Tensor> grad_std;
  if (std_.has_value()) grad_std = at::empty(std_->sizes(), std_->options());
  const cudaError_t err = cuda::launch_chain_logprob_bwd(
      to_dtype(chain.scalar_type()), g.data_ptr(), chain.data_ptr(), v.data_ptr(), Kv,
      t_grid.data_ptr<float>(), static_cast<int>(mode), opt_ptr(std_),
      steps.has_value() ? steps->data_ptr<int64_t>() : nullptr, noise_level, smk.data,
      smk.bstride, dmk.data, dmk.bstride, B, K, H, D, grad_v.data_ptr(),
      grad_std.has_value() ? grad_std->data_ptr() : nullptr,
      c10::cuda::getCurrentCUDAStream(device.index()).stream());
  check_launch(err, "chain_logprob_bwd");
  return {grad_v, grad_std};
}

// ---------------------------------------------------------------------------------------
// cfm_loss / cfm_interpolate
// ---------------------------------------------------------------------------------------
namespace {

// actions (B, H, D) and noise (B, N, H, D) of one dtype; returns N.
int64_t check_cfm_pair(const at::Tensor& actions, const at::Tensor& noise, const char* fn) {
  check_main(actions, fn, "actions", 3, "(B, H, D)");
  const int64_t B = actions.size(0), H = actions.size(1), D = actions.size(2);
  check_row(H, D, fn);
  TORCH_CHECK_VALUE(noise.dim() == 4, fn, ": noise must have shape (B, N, H, D), got ",
                    noise.sizes());
  const int64_t N = noise.size(1);
  check_like(noise, actions, "actions", {B, N, H, D}, fn, "noise", "(B, N, H, D)");
  return N;
}

}  // namespace

at::Tensor cfm_loss_fwd_cuda(const at::Tensor& actions, const at::Tensor& noise,
                             const at::Tensor& v_pred, const at::Tensor& sm, const at::Tensor& dm,
                             const at::Tensor& inv_wsum) {
  const char* fn = "cfm_loss_fwd_cuda";
  const int64_t N = check_cfm_pair(actions, noise, fn);
  const int64_t B = actions.size(0), H = actions.size(1), D = actions.size(2);
  const at::Device device = actions.device();
  check_like(v_pred, actions, "actions", {B, N, H, D}, fn, "v_pred", "(B, N, H, D)");
  const Mask smk = check_mask(sm, B, H, device, fn, "sm", "H");
  const Mask dmk = check_mask(dm, B, D, device, fn, "dm", "D");
  check_f32(inv_wsum, device, {B}, fn, "inv_wsum", "(B,)");

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor loss = at::empty({B, N}, actions.options().dtype(acc_dtype(actions.scalar_type())));
  const cudaError_t err = cuda::launch_cfm_loss_fwd(
      to_dtype(actions.scalar_type()), actions.data_ptr(), noise.data_ptr(), v_pred.data_ptr(),
      smk.data, smk.bstride, dmk.data, dmk.bstride, inv_wsum.data_ptr<float>(), B, N, H, D,
      loss.data_ptr(), c10::cuda::getCurrentCUDAStream(device.index()).stream());
  check_launch(err, "cfm_loss_fwd");
  return loss;
}

at::Tensor cfm_loss_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& actions,
                             const at::Tensor& noise, const at::Tensor& v_pred,
                             const at::Tensor& sm, const at::Tensor& dm,
                             const at::Tensor& inv_wsum) {
  const char* fn = "cfm_loss_bwd_cuda";
  const int64_t N = check_cfm_pair(actions, noise, fn);
  const int64_t B = actions.size(0), H = actions.size(1), D = actions.size(2);
  const at::Device device = actions.device();
  check_like(v_pred, actions, "actions", {B, N, H, D}, fn, "v_pred", "(B, N, H, D)");
  const at::Tensor g =
      check_grad(grad_loss, actions.scalar_type(), device, {B, N}, fn, "grad_loss", "(B, N)");
  const Mask smk = check_mask(sm, B, H, device, fn, "sm", "H");
  const Mask dmk = check_mask(dm, B, D, device, fn, "dm", "D");
  check_f32(inv_wsum, device, {B}, fn, "inv_wsum", "(B,)");

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor grad_v = at::empty(v_pred.sizes(), v_pred.options());
  const cudaError_t err = cuda::launch_cfm_loss_bwd(
      to_dtype(actions.scalar_type()), g.data_ptr(), actions.data_ptr(), noise.data_ptr(),
      v_pred.data_ptr(), smk.data, smk.bstride, dmk.data, dmk.bstride,
      inv_wsum.data_ptr<float>(), B, N, H, D, grad_v.data_ptr(),
      c10::cuda::getCurrentCUDAStream(device.index()).stream());
  check_launch(err, "cfm_loss_bwd");
  return grad_v;
}

at::Tensor cfm_interpolate_fwd_cuda(const at::Tensor& actions, const at::Tensor& noise,
                                    const at::Tensor& tau) {
  const char* fn = "cfm_interpolate_fwd_cuda";
  const int64_t N = check_cfm_pair(actions, noise, fn);
  const int64_t B = actions.size(0), H = actions.size(1), D = actions.size(2);
  const at::Device device = actions.device();
  check_f32(tau, device, {B, N}, fn, "tau", "(B, N)");

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor x_tau = at::empty(noise.sizes(), noise.options());
  const cudaError_t err = cuda::launch_cfm_interpolate_fwd(
      to_dtype(actions.scalar_type()), actions.data_ptr(), noise.data_ptr(),
      tau.data_ptr<float>(), B, N, H, D, x_tau.data_ptr(),
      c10::cuda::getCurrentCUDAStream(device.index()).stream());
  check_launch(err, "cfm_interpolate_fwd");
  return x_tau;
}

}  // namespace flowkernels
