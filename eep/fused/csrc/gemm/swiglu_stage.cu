// The one extra launch of the fused-SwiGLU stage (compiled only into libraries holding a swiglu GEMM).
//
// eep_stage_setup writes GEMM1's D as h13 [rows, 2I] (pointer h13 + row * 2I, leading dimension 2I).
// With SwiGLU in GEMM1's epilogue, D is h [rows, I] instead: every D pointer's offset from h13 and
// every leading dimension halve. Patching the plan on the device keeps stage.cu (the default path)
// unchanged and the step free of host syncs, so it stays CUDA-graph capturable.
#include <cstdio>

#include "expert_gemm.cuh"

namespace eep_gemm {

__global__ void swiglu_plan_patch_kernel(char* plan, int num_groups, const __nv_bfloat16* h13, __nv_bfloat16* h) {
  GemmPlan p = plan_at(plan, num_groups);  // GEMM1's plan sits at offset 0 of the stage plan
  for (int g = blockIdx.x * blockDim.x + threadIdx.x; g < num_groups; g += gridDim.x * blockDim.x) {
    const int64_t offset = static_cast<const __nv_bfloat16*>(p.ptr_d[g]) - h13;  // row * 2I: even
    p.ptr_d[g] = h + offset / 2;
    p.ld_d[g] = p.ld_d[g] / 2;
  }
}

}  // namespace eep_gemm

extern "C" int eep_swiglu_plan_patch(char* plan, int num_groups, const void* h13, void* h, cudaStream_t stream,
                                     char* err, size_t err_len) {
  const int threads = 256;
  const int blocks = (num_groups + threads - 1) / threads;
  eep_gemm::swiglu_plan_patch_kernel<<<blocks > 0 ? blocks : 1, threads, 0, stream>>>(
      plan, num_groups, static_cast<const __nv_bfloat16*>(h13), static_cast<__nv_bfloat16*>(h));
  cudaError_t ce = cudaGetLastError();
  if (ce != cudaSuccess) {
    snprintf(err, err_len, "swiglu_plan_patch_kernel: %s", cudaGetErrorString(ce));
    return -int(ce);
  }
  return 0;
}
