// Declarations of the fused flow ops' host entry points (see docs/kernels.md).
// The *_cpu functions live in csrc/cpu, the *_cuda ones in csrc/cuda (built only with CUDA).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace flowkernels {

#define FLOWKERNELS_DECLARE(SUFFIX)                                                           \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_step_fwd_##SUFFIX(                      \
      const at::Tensor& x, const at::Tensor& v, const at::Tensor& t, double dt, int64_t mode, \
      const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& std_,          \
      int64_t seed, int64_t offset, double noise_level, const at::Tensor& sm,                 \
      const at::Tensor& dm);                                                                  \
  at::Tensor chain_logprob_fwd_##SUFFIX(                                                      \
      const at::Tensor& chain, const at::Tensor& v, const at::Tensor& t_grid, int64_t mode,   \
      const std::optional<at::Tensor>& std_, const std::optional<at::Tensor>& steps,          \
      bool include_initial, double noise_level, const at::Tensor& sm, const at::Tensor& dm);  \
  std::tuple<at::Tensor, std::optional<at::Tensor>> chain_logprob_bwd_##SUFFIX(               \
      const at::Tensor& grad_terms, const at::Tensor& chain, const at::Tensor& v,             \
      const at::Tensor& t_grid, int64_t mode, const std::optional<at::Tensor>& std_,          \
      const std::optional<at::Tensor>& steps, double noise_level, const at::Tensor& sm,       \
      const at::Tensor& dm);                                                                  \
  at::Tensor cfm_loss_fwd_##SUFFIX(const at::Tensor& actions, const at::Tensor& noise,        \
                                   const at::Tensor& v_pred, const at::Tensor& sm,            \
                                   const at::Tensor& dm, const at::Tensor& inv_wsum);         \
  at::Tensor cfm_loss_bwd_##SUFFIX(const at::Tensor& grad_loss, const at::Tensor& actions,    \
                                   const at::Tensor& noise, const at::Tensor& v_pred,         \
                                   const at::Tensor& sm, const at::Tensor& dm,                \
                                   const at::Tensor& inv_wsum);                               \
  at::Tensor cfm_interpolate_fwd_##SUFFIX(const at::Tensor& actions, const at::Tensor& noise, \
                                          const at::Tensor& tau);

FLOWKERNELS_DECLARE(cpu)
#ifdef FLOWKERNELS_WITH_CUDA
FLOWKERNELS_DECLARE(cuda)
#endif

#undef FLOWKERNELS_DECLARE

}  // namespace flowkernels
