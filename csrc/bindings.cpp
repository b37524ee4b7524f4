// Python bindings of flowkernels._C. The CUDA entry points exist only in CUDA builds;
// `flowkernels._C.has_cuda` tells which.
#include "flow_ops.h"

#define FLOWKERNELS_BIND(SUFFIX)                                                  \
  m.def("flow_step_fwd_" #SUFFIX, &flowkernels::flow_step_fwd_##SUFFIX);         \
  m.def("chain_logprob_fwd_" #SUFFIX, &flowkernels::chain_logprob_fwd_##SUFFIX); \
  m.def("chain_logprob_bwd_" #SUFFIX, &flowkernels::chain_logprob_bwd_##SUFFIX); \
  m.def("cfm_loss_fwd_" #SUFFIX, &flowkernels::cfm_loss_fwd_##SUFFIX);           \
  m.def("cfm_loss_bwd_" #SUFFIX, &flowkernels::cfm_loss_bwd_##SUFFIX);           \
  m.def("cfm_interpolate_fwd_" #SUFFIX, &flowkernels::cfm_interpolate_fwd_##SUFFIX);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flowkernels C++/CUDA kernels (see docs/kernels.md)";
  FLOWKERNELS_BIND(cpu)
#ifdef FLOWKERNELS_WITH_CUDA
  FLOWKERNELS_BIND(cuda)
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
