// Expert stage on Hopper: CUTLASS SM90 pointer-array grouped GEMMs over the dispatch receive layout.
// This header holds the plan layout shared by the stage kernels (stage.cu, fp8_stage.cu) and the
// generated GEMM units, and the device helpers both stages' setup and row copies use; it defines no
// kernel, so every unit can include it.
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

// Block-scale pointers of one FP8 grouped GEMM (fp8_stage.cu, fp8_gemm.cuh), right after its GemmPlan:
// per group, A's and B's float32 scales. Their layout follows from the group's problem shape (CUTLASS
// derives it per group): K-major, one scale per 128 K elements per row (activations) or per 128 rows
// (weights), i.e. an activation's scales are [rows, K/128] row-major and a weight's are the checkpoint's
// weight_scale_inv [out/128, in/128].
struct ScalePlan {
  const float** ptr_sfa;  // [num_groups]
  const float** ptr_sfb;  // [num_groups]
};

__host__ __device__ inline size_t scaled_plan_nbytes_one(int num_groups) {
  return plan_nbytes_one(num_groups) + 2 * align_up(size_t(num_groups) * 8, 16);
}

__host__ __device__ inline ScalePlan scale_plan_at(char* gemm_plan, int num_groups) {
  char* base = gemm_plan + plan_nbytes_one(num_groups);
  ScalePlan q;
  q.ptr_sfa = reinterpret_cast<const float**>(base);
  q.ptr_sfb = reinterpret_cast<const float**>(base + align_up(size_t(num_groups) * 8, 16));
  return q;
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

// write_group plus the scales of the token rows (scale_x) and of the weight rows (scale_w).
__device__ inline void write_scaled_group(GemmPlan p, ScalePlan q, int g, bool swap, int tokens, int n_w, int k,
                                          const void* x, int64_t ld_x, const float* scale_x, const void* w,
                                          int64_t ld_w, const float* scale_w, void* d, int64_t ld_d) {
  write_group(p, g, swap, tokens, n_w, k, x, ld_x, w, ld_w, d, ld_d);
  q.ptr_sfa[g] = swap ? scale_w : scale_x;
  q.ptr_sfb[g] = swap ? scale_x : scale_w;
}

// The rows of the receive layout's (slot, source) blocks that one stage step keeps, and where they go
// in the compact intermediate (slot-major, exclusive prefix sum of the counts). Counts come from peers:
// one outside [0, max_tokens_per_rank] is clamped (error bit 1), a block that would overflow
// capacity_rows is emptied (error bit 2). Run by every thread of one block; calls
// visit(g, slot, src, tokens, first_compact_row) for each block the thread owns, then the last thread
// writes total_rows and every thread ORs its error bits into *error (the caller zeroed both).
template <class Visit>
__device__ void scan_blocks(const int* __restrict__ count, const StageShape& s, int* row_count, int* row_offset,
                            int* total_rows, int* error, Visit visit) {
  __shared__ int partial[kMaxSetupThreads];
  const int num_groups = s.slots_per_rank * s.num_ranks;
  const int per_thread = (num_groups + blockDim.x - 1) / blockDim.x;
  const int first = threadIdx.x * per_thread;
  const int last = min(num_groups, first + per_thread);
  int sum = 0;
  for (int g = first; g < last; ++g) sum += min(max(count[g], 0), s.max_tokens_per_rank);
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int step = 1; step < blockDim.x; step <<= 1) {  // inclusive Hillis-Steele scan of the partials
    int v = threadIdx.x >= step ? partial[threadIdx.x - step] : 0;
    __syncthreads();
    partial[threadIdx.x] += v;
    __syncthreads();
  }
  int offset = partial[threadIdx.x] - sum;
  int bad = 0;
  for (int g = first; g < last; ++g) {
    const int raw = count[g];
    int tokens = min(max(raw, 0), s.max_tokens_per_rank);
    if (raw != tokens) bad |= 1;
    if (offset + tokens > s.capacity_rows) { bad |= 2; tokens = 0; }
    row_count[g] = tokens;
    row_offset[g] = offset;
    visit(g, g / s.num_ranks, g % s.num_ranks, tokens, offset);
    offset += tokens;
  }
  if (bad) atomicOr(error, bad);
  if (threadIdx.x == blockDim.x - 1) *total_rows = min(offset, s.capacity_rows);
  __syncthreads();  // row_offset / row_count are read by other threads after this
}

// Per-slot grouping: one slot's kept rows are contiguous in the compact order (blocks skipped for
// capacity form a suffix), starting at its first block's offset.
__device__ inline void slot_span(const int* row_count, const int* row_offset, const StageShape& s, int slot,
                                 int* tokens, int64_t* first_row) {
  const int first_block = slot * s.num_ranks;
  int n = 0;
  for (int src = 0; src < s.num_ranks; ++src) n += row_count[first_block + src];
  *tokens = n;
  *first_row = row_offset[first_block];
}

// Copy the kept rows of block blockIdx.x between the receive layout and the compact rows, 16 bytes a
// step: to_compact gathers (layout -> compact), else scatters. Strides in bytes; row_bytes % 16 == 0.
__device__ inline void copy_block_rows(char* layout, char* compact, const int* row_count, const int* row_offset,
                                       const StageShape& s, int64_t slot_stride, int64_t src_stride,
                                       int64_t row_stride, int row_bytes, bool to_compact) {
  const int g = blockIdx.x;
  const int n = row_count[g], off = row_offset[g];
  const int slot = g / s.num_ranks, src = g % s.num_ranks;
  const int vec_per_row = row_bytes / 16;
  for (int j = blockIdx.y; j < n; j += gridDim.y) {
    uint4* l = reinterpret_cast<uint4*>(layout + slot * slot_stride + src * src_stride + j * row_stride);
    uint4* c = reinterpret_cast<uint4*>(compact + int64_t(off + j) * row_bytes);
    for (int v = threadIdx.x; v < vec_per_row; v += blockDim.x) {
      if (to_compact) c[v] = l[v]; else l[v] = c[v];
    }
  }
}

}  // namespace eep_gemm
