// Expert stage on Hopper: CUTLASS SM90 pointer-array grouped GEMMs over the dispatch receive layout.
// This header holds the plan layout shared by stage.cu (setup and SwiGLU kernels) and the generated
// GEMM units; it defines no kernel, so every unit can include it.
//
// Everything a step needs is computed on the device from the receive counts (no host sync), so the
// whole stage is capturable in a CUDA graph:
//
//   eep_stage_setup   counts [slots_per_rank, num_ranks] -> per-group problem sizes, pointers and
//                     strides for both GEMMs, plus the row offsets of the compact intermediate
//   eep_gemm_<cfg>    one grouped GEMM  D[g] = A[g] @ B[g]^T  (bf16 in, fp32 accumulate, bf16 out)
//   eep_swiglu        h[row, i] = silu(h13[row, i]) * h13[row, I + i] over the compact rows
//
// One group per (local slot, source rank) block of the receive layout: GEMM1 reads the block where
// dispatch wrote it (row stride given, no gather), GEMM2 writes the block where combine reads it.
// The intermediate between the GEMMs is ours, so it is compact (exclusive prefix sum of counts).
//
// "swap" kernels compute D^T = W @ X^T (weights on M, tokens on N) so that the handful of tokens a
// decode block holds fills an N tile of 16..64 instead of wasting most of a 64/128-row M tile.
// The plan stores the same pointers either way; only their order in (A, B) and the problem shape
// change. Every CUTLASS stride used here is one int64 in memory (checked by static_assert in the
// GEMM translation units), so the plan stores strides as int64 leading dimensions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace eep_gemm {

constexpr int kMaxSetupThreads = 1024;

// Device-resident plan of one grouped GEMM, laid out in one buffer (offsets in plan_layout()).
struct GemmPlan {
  int* problems;        // [num_groups, 3] (M, N, K) as CUTLASS's GroupProblemShape reads them
  const void** ptr_a;   // [num_groups]
  const void** ptr_b;   // [num_groups]
  void** ptr_d;         // [num_groups]
  int64_t* ld_a;        // [num_groups]
  int64_t* ld_b;        // [num_groups]
  int64_t* ld_d;        // [num_groups]
};

struct StageShape {
  int slots_per_rank;
  int num_ranks;
  int max_tokens_per_rank;
  int hidden;
  int inter;
  int capacity_rows;      // rows of the compact intermediate
  int64_t x_slot_stride;  // elements; x and out share the receive layout strides
  int64_t x_src_stride;
  int64_t x_row_stride;
  int64_t w13_slot_stride;  // elements between consecutive local slots of w13 [*, 2I, H]
  int64_t w2_slot_stride;   // of w2 [*, H, I]
};

__host__ __device__ inline size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// Byte offsets of the arrays of one GemmPlan inside a plan buffer holding num_groups groups.
__host__ __device__ inline size_t plan_nbytes_one(int num_groups) {
  size_t n = align_up(size_t(num_groups) * 3 * sizeof(int), 16);
  return n + 6 * align_up(size_t(num_groups) * 8, 16);
}

__host__ __device__ inline GemmPlan plan_at(char* base, int num_groups) {
  GemmPlan p;
  size_t off = 0;
  size_t arr = align_up(size_t(num_groups) * 8, 16);
  p.problems = reinterpret_cast<int*>(base);
  off += align_up(size_t(num_groups) * 3 * sizeof(int), 16);
  p.ptr_a = reinterpret_cast<const void**>(base + off); off += arr;
  p.ptr_b = reinterpret_cast<const void**>(base + off); off += arr;
  p.ptr_d = reinterpret_cast<void**>(base + off); off += arr;
  p.ld_a = reinterpret_cast<int64_t*>(base + off); off += arr;
  p.ld_b = reinterpret_cast<int64_t*>(base + off); off += arr;
  p.ld_d = reinterpret_cast<int64_t*>(base + off);
  return p;
}

// Plan buffer: [GemmPlan 1][GemmPlan 2][row_offset int32 x num_groups][total_rows int32][error int32]
__host__ __device__ inline size_t stage_plan_nbytes(int num_groups) {
  return 2 * plan_nbytes_one(num_groups) + align_up(size_t(num_groups) * 4, 16) + 16;
}

__device__ inline void write_group(GemmPlan p, int g, bool swap, int tokens, int n_w, int k,
                                   const void* x, int64_t ld_x, const void* w, int64_t ld_w,
                                   void* d, int64_t ld_d) {
  // Problem: D[tokens, n_w] = X[tokens, k] @ W[n_w, k]^T; swapped: D^T[n_w, tokens] = W @ X^T.
  p.problems[3 * g + 0] = swap ? n_w : tokens;
  p.problems[3 * g + 1] = swap ? tokens : n_w;
  p.problems[3 * g + 2] = k;
  p.ptr_a[g] = swap ? w : x;
  p.ptr_b[g] = swap ? x : w;
  p.ld_a[g] = swap ? ld_w : ld_x;
  p.ld_b[g] = swap ? ld_x : ld_w;
  p.ptr_d[g] = d;
  p.ld_d[g] = ld_d;
}

}  // namespace eep_gemm
