// C entry points of the small kernels around the grouped GEMMs (plan setup, row gather/scatter, SwiGLU).
//
// Two groupings (chosen per stage, see docs/expert_gemm.md):
//   per block: one GEMM group per (slot, source) block; GEMM1 reads x and GEMM2 writes out in place.
//   per slot:  one group per slot over compact rows; x rows are gathered first and outputs scattered
//              back. For decode, where each slot's weights dominate the bytes, this reads each
//              weight once instead of once per source block.
#include <cstdio>

#include "expert_gemm.cuh"

namespace eep_gemm {

// Past the plan of expert_gemm.cuh (kept there so the GEMM units need not change): rows kept per block.
__host__ __device__ inline size_t row_count_offset(int num_blocks) { return stage_plan_nbytes(num_blocks); }
__host__ __device__ inline size_t full_plan_nbytes(int num_blocks) {
  return row_count_offset(num_blocks) + align_up(size_t(num_blocks) * 4, 16);
}

// One block: the shared scan (expert_gemm.cuh) decides each block's kept rows and compact offset.
__global__ void __launch_bounds__(kMaxSetupThreads)
stage_setup_kernel(const int* __restrict__ count, StageShape s, const __nv_bfloat16* x, const __nv_bfloat16* w13,
                   const __nv_bfloat16* w2, __nv_bfloat16* h13, __nv_bfloat16* h, __nv_bfloat16* out, char* plan,
                   bool swap1, bool swap2, bool per_slot, __nv_bfloat16* xc, __nv_bfloat16* yc) {
  const int num_groups = s.slots_per_rank * s.num_ranks;
  int* row_count = reinterpret_cast<int*>(plan + row_count_offset(num_groups));
  GemmPlan p1 = plan_at(plan, num_groups);
  GemmPlan p2 = plan_at(plan + plan_nbytes_one(num_groups), num_groups);
  int* row_offset = reinterpret_cast<int*>(plan + 2 * plan_nbytes_one(num_groups));
  int* total_rows = row_offset + align_up(size_t(num_groups) * 4, 16) / 4;
  const int n13 = 2 * s.inter;
  scan_blocks(count, s, row_count, row_offset, total_rows, total_rows + 1,
              [&](int g, int slot, int src, int tokens, int row) {
                if (per_slot) return;
                const int64_t block = slot * s.x_slot_stride + src * s.x_src_stride;
                write_group(p1, g, swap1, tokens, n13, s.hidden, x + block, s.x_row_stride,
                            w13 + slot * s.w13_slot_stride, s.hidden, h13 + int64_t(row) * n13, n13);
                write_group(p2, g, swap2, tokens, s.hidden, s.inter, h + int64_t(row) * s.inter, s.inter,
                            w2 + slot * s.w2_slot_stride, s.inter, out + block, s.x_row_stride);
              });
  if (!per_slot) return;
  GemmPlan q1 = plan_at(plan, s.slots_per_rank);
  GemmPlan q2 = plan_at(plan + plan_nbytes_one(s.slots_per_rank), s.slots_per_rank);
  for (int slot = threadIdx.x; slot < s.slots_per_rank; slot += blockDim.x) {
    int tokens;
    int64_t off;
    slot_span(row_count, row_offset, s, slot, &tokens, &off);
    write_group(q1, slot, swap1, tokens, n13, s.hidden, xc + off * s.hidden, s.hidden,
                w13 + slot * s.w13_slot_stride, s.hidden, h13 + off * n13, n13);
    write_group(q2, slot, swap2, tokens, s.hidden, s.inter, h + off * s.inter, s.inter,
                w2 + slot * s.w2_slot_stride, s.inter, yc + off * s.hidden, s.hidden);
  }
}

// Per-slot grouping: copy the kept rows of block blockIdx.x between the receive layout and the
// compact buffer (to_compact: gather x before GEMM1; else scatter GEMM2's rows to out).
__global__ void copy_rows_kernel(__nv_bfloat16* layout, __nv_bfloat16* compact, const char* plan, StageShape s,
                                 bool to_compact) {
  const int num_blocks = s.slots_per_rank * s.num_ranks;
  const int* row_offset = reinterpret_cast<const int*>(plan + 2 * plan_nbytes_one(num_blocks));
  const int* row_count = reinterpret_cast<const int*>(plan + row_count_offset(num_blocks));
  const int64_t e = sizeof(__nv_bfloat16);
  copy_block_rows(reinterpret_cast<char*>(layout), reinterpret_cast<char*>(compact), row_count, row_offset, s,
                  s.x_slot_stride * e, s.x_src_stride * e, s.x_row_stride * e, int(s.hidden * e), to_compact);
}

__device__ inline float silu(float v) { return v / (1.f + __expf(-v)); }

// h[row, :] = silu(h13[row, :I]) * h13[row, I:], 8 bf16 (16 bytes) per thread step; rows past
// the device-side total are skipped, so a graph sized for the capacity does only the live rows.
__global__ void swiglu_kernel(const __nv_bfloat16* __restrict__ h13, __nv_bfloat16* __restrict__ h,
                              const int* __restrict__ total_rows, int inter) {
  const int vec_per_row = inter / 8;
  const int64_t n = int64_t(*total_rows) * vec_per_row;
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < n; v += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = v / vec_per_row;
    const int col = int(v % vec_per_row) * 8;
    const uint4 g = *reinterpret_cast<const uint4*>(h13 + row * 2 * inter + col);
    const uint4 u = *reinterpret_cast<const uint4*>(h13 + row * 2 * inter + inter + col);
    const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&g);
    const __nv_bfloat162* u2 = reinterpret_cast<const __nv_bfloat162*>(&u);
    uint4 o;
    __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 gf = __bfloat1622float2(g2[i]);
      const float2 uf = __bfloat1622float2(u2[i]);
      o2[i] = __floats2bfloat162_rn(silu(gf.x) * uf.x, silu(gf.y) * uf.y);
    }
    *reinterpret_cast<uint4*>(h + row * inter + col) = o;
  }
}

}  // namespace eep_gemm

extern "C" size_t eep_stage_plan_nbytes(int num_groups) { return eep_gemm::full_plan_nbytes(num_groups); }

extern "C" size_t eep_stage_plan_gemm_offset(int num_groups, int which) {
  return which == 1 ? 0 : eep_gemm::plan_nbytes_one(num_groups);
}

extern "C" size_t eep_stage_total_rows_offset(int num_groups) {
  return 2 * eep_gemm::plan_nbytes_one(num_groups) + eep_gemm::align_up(size_t(num_groups) * 4, 16);
}

extern "C" int eep_stage_setup(const int* count, const eep_gemm::StageShape* shape, const void* x, const void* w13,
                               const void* w2, void* h13, void* h, void* out, char* plan, int swap1, int swap2,
                               int per_slot, void* xc, void* yc, cudaStream_t stream, char* err, size_t err_len) {
  const int num_groups = shape->slots_per_rank * shape->num_ranks;
  int threads = 32;
  while (threads < num_groups && threads < eep_gemm::kMaxSetupThreads) threads *= 2;
  // The error word and the total are cleared by the kernel's caller-visible contract: zero them here.
  cudaMemsetAsync(plan + eep_stage_total_rows_offset(num_groups), 0, 8, stream);
  eep_gemm::stage_setup_kernel<<<1, threads, 0, stream>>>(
      count, *shape, static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(w13),
      static_cast<const __nv_bfloat16*>(w2), static_cast<__nv_bfloat16*>(h13), static_cast<__nv_bfloat16*>(h),
      static_cast<__nv_bfloat16*>(out), plan, swap1 != 0, swap2 != 0, per_slot != 0,
      static_cast<__nv_bfloat16*>(xc), static_cast<__nv_bfloat16*>(yc));
  cudaError_t ce = cudaGetLastError();
  if (ce != cudaSuccess) {
    snprintf(err, err_len, "stage_setup_kernel: %s", cudaGetErrorString(ce));
    return -int(ce);
  }
  return 0;
}

extern "C" int eep_swiglu(const void* h13, void* h, const char* plan, int num_groups, int capacity_rows, int inter,
                          int sm_count, cudaStream_t stream, char* err, size_t err_len) {
  const int* total = reinterpret_cast<const int*>(plan + eep_stage_total_rows_offset(num_groups));
  const long long vecs = (long long)capacity_rows * (inter / 8);
  int blocks = (int)((vecs + 255) / 256);
  blocks = blocks < 4 * sm_count ? (blocks > 0 ? blocks : 1) : 4 * sm_count;
  eep_gemm::swiglu_kernel<<<blocks, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(h13),
                                                     static_cast<__nv_bfloat16*>(h), total, inter);
  cudaError_t ce = cudaGetLastError();
  if (ce != cudaSuccess) {
    snprintf(err, err_len, "swiglu_kernel: %s", cudaGetErrorString(ce));
    return -int(ce);
  }
  return 0;
}

extern "C" int eep_copy_rows(void* layout, void* compact, const char* plan, const eep_gemm::StageShape* shape,
                             int to_compact, cudaStream_t stream, char* err, size_t err_len) {
  const int num_blocks = shape->slots_per_rank * shape->num_ranks;
  const int rows_per_cta = shape->max_tokens_per_rank < 16 ? shape->max_tokens_per_rank : 16;
  dim3 grid(num_blocks, rows_per_cta);
  eep_gemm::copy_rows_kernel<<<grid, 128, 0, stream>>>(static_cast<__nv_bfloat16*>(layout),
                                                       static_cast<__nv_bfloat16*>(compact), plan, *shape,
                                                       to_compact != 0);
  cudaError_t ce = cudaGetLastError();
  if (ce != cudaSuccess) {
    snprintf(err, err_len, "copy_rows_kernel: %s", cudaGetErrorString(ce));
    return -int(ce);
  }
  return 0;
}
