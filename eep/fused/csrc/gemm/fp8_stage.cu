// C entry points of the FP8 expert stage's small kernels, around its two FP8 grouped GEMMs (fp8_gemm.cuh):
//
//   eep_fp8_stage_setup   counts -> both GEMMs' problems, pointers, leading dimensions and scale pointers
//   eep_fp8_gather        the token rows' scales into compact [rows, hidden/128] form (unless GEMM1 can
//                         read the dispatched ones in place), and with per-slot groups the e4m3 rows too
//   GEMM1                 h13 = x @ w13^T, block-scaled FP8, bf16 out
//   eep_fp8_swiglu_quant  h = silu(gate) * up, requantised per token and 128 channels: hq e4m3 + hs float32
//   GEMM2                 out = hq @ w2^T, block-scaled FP8, bf16 out, into the receive layout
//   eep_fp8_scatter       with per-slot groups, GEMM2's compact rows into the receive layout
//
// The grouping, the shared scan of counts and the error word are those of the bf16 stage (stage.cu,
// expert_gemm.cuh). Every step reads the device counts and totals, so the stage never waits for the
// host and can be captured in a CUDA graph.
//
// Activation scales come from dispatch in any of two forms, addressed through strides in floats:
// one per 128 channels (col stride 1) or one per row (col stride 0, the decode buffer today). GEMM1
// reads them where dispatch wrote them when each row's scales are hidden/128 contiguous floats and
// one block's rows follow each other (per-block groups); otherwise eep_fp8_gather writes them compact.
#include <cuda_fp8.h>

#include <cstdio>

#include "expert_gemm.cuh"

namespace eep_gemm {

constexpr int kScaleBlock = 128;

struct Fp8Operands {
  int64_t xs_slot_stride;  // token scales: scale(slot, src, row, c) at x_scale[slot * . + src * . + row * . + c * .]
  int64_t xs_src_stride;
  int64_t xs_row_stride;
  int64_t xs_col_stride;  // 0: one scale per row
  int xs_in_place;        // GEMM1 reads x_scale itself (per-block groups, rows of hidden/128 contiguous floats)
  int64_t out_slot_stride;  // bf16 elements of the output receive layout
  int64_t out_src_stride;
  int64_t out_row_stride;
  int64_t w13_scale_slot_stride;  // floats between consecutive slots' [2I/128, H/128] scales
  int64_t w2_scale_slot_stride;   // of [H/128, I/128]
};

// Plan: [GEMM1 plan + scales][GEMM2 plan + scales][row_offset int32 x blocks][total_rows, error][row_count x blocks]
__host__ __device__ inline size_t fp8_row_offset_offset(int num_blocks) { return 2 * scaled_plan_nbytes_one(num_blocks); }
__host__ __device__ inline size_t fp8_total_rows_offset(int num_blocks) {
  return fp8_row_offset_offset(num_blocks) + align_up(size_t(num_blocks) * 4, 16);
}
__host__ __device__ inline size_t fp8_row_count_offset(int num_blocks) { return fp8_total_rows_offset(num_blocks) + 16; }
__host__ __device__ inline size_t fp8_plan_nbytes(int num_blocks) {
  return fp8_row_count_offset(num_blocks) + align_up(size_t(num_blocks) * 4, 16);
}

__global__ void __launch_bounds__(kMaxSetupThreads)
fp8_setup_kernel(const int* __restrict__ count, StageShape s, Fp8Operands o, const uint8_t* x, const float* x_scale,
                 const uint8_t* w13, const float* w13_scale, const uint8_t* w2, const float* w2_scale,
                 __nv_bfloat16* h13, uint8_t* hq, float* hs, float* xs, __nv_bfloat16* out, char* plan, bool swap1,
                 bool swap2, bool per_slot, uint8_t* xc, __nv_bfloat16* yc) {
  const int num_blocks = s.slots_per_rank * s.num_ranks;
  int* row_offset = reinterpret_cast<int*>(plan + fp8_row_offset_offset(num_blocks));
  int* total_rows = reinterpret_cast<int*>(plan + fp8_total_rows_offset(num_blocks));
  int* row_count = reinterpret_cast<int*>(plan + fp8_row_count_offset(num_blocks));
  const int n13 = 2 * s.inter, kb = s.hidden / kScaleBlock, kb_inter = s.inter / kScaleBlock;
  GemmPlan p1 = plan_at(plan, num_blocks);
  ScalePlan q1 = scale_plan_at(plan, num_blocks);
  GemmPlan p2 = plan_at(plan + scaled_plan_nbytes_one(num_blocks), num_blocks);
  ScalePlan q2 = scale_plan_at(plan + scaled_plan_nbytes_one(num_blocks), num_blocks);
  scan_blocks(count, s, row_count, row_offset, total_rows, total_rows + 1,
              [&](int g, int slot, int src, int tokens, int row) {
                if (per_slot) return;
                const float* sx = o.xs_in_place ? x_scale + slot * o.xs_slot_stride + src * o.xs_src_stride
                                                : xs + int64_t(row) * kb;
                write_scaled_group(p1, q1, g, swap1, tokens, n13, s.hidden,
                                   x + slot * s.x_slot_stride + src * s.x_src_stride, s.x_row_stride, sx,
                                   w13 + slot * s.w13_slot_stride, s.hidden, w13_scale + slot * o.w13_scale_slot_stride,
                                   h13 + int64_t(row) * n13, n13);
                write_scaled_group(p2, q2, g, swap2, tokens, s.hidden, s.inter, hq + int64_t(row) * s.inter, s.inter,
                                   hs + int64_t(row) * kb_inter, w2 + slot * s.w2_slot_stride, s.inter,
                                   w2_scale + slot * o.w2_scale_slot_stride,
                                   out + slot * o.out_slot_stride + src * o.out_src_stride, o.out_row_stride);
              });
  if (!per_slot) return;
  GemmPlan r1 = plan_at(plan, s.slots_per_rank);
  ScalePlan t1 = scale_plan_at(plan, s.slots_per_rank);
  GemmPlan r2 = plan_at(plan + scaled_plan_nbytes_one(s.slots_per_rank), s.slots_per_rank);
  ScalePlan t2 = scale_plan_at(plan + scaled_plan_nbytes_one(s.slots_per_rank), s.slots_per_rank);
  for (int slot = threadIdx.x; slot < s.slots_per_rank; slot += blockDim.x) {
    int tokens;
    int64_t off;
    slot_span(row_count, row_offset, s, slot, &tokens, &off);
    write_scaled_group(r1, t1, slot, swap1, tokens, n13, s.hidden, xc + off * s.hidden, s.hidden, xs + off * kb,
                       w13 + slot * s.w13_slot_stride, s.hidden, w13_scale + slot * o.w13_scale_slot_stride,
                       h13 + off * n13, n13);
    write_scaled_group(r2, t2, slot, swap2, tokens, s.hidden, s.inter, hq + off * s.inter, s.inter,
                       hs + off * kb_inter, w2 + slot * s.w2_slot_stride, s.inter,
                       w2_scale + slot * o.w2_scale_slot_stride, yc + off * s.hidden, s.hidden);
  }
}

// Block blockIdx.x's kept rows: their scales into xs [rows, hidden/128] (scales), their e4m3 rows into
// xc (rows, per-slot groups).
__global__ void fp8_gather_kernel(const uint8_t* x, const float* x_scale, uint8_t* xc, float* xs, const char* plan,
                                  StageShape s, Fp8Operands o, bool rows, bool scales) {
  const int num_blocks = s.slots_per_rank * s.num_ranks;
  const int* row_offset = reinterpret_cast<const int*>(plan + fp8_row_offset_offset(num_blocks));
  const int* row_count = reinterpret_cast<const int*>(plan + fp8_row_count_offset(num_blocks));
  if (rows)
    copy_block_rows(const_cast<char*>(reinterpret_cast<const char*>(x)), reinterpret_cast<char*>(xc), row_count,
                    row_offset, s, s.x_slot_stride, s.x_src_stride, s.x_row_stride, s.hidden, true);
  if (!scales) return;
  const int g = blockIdx.x, n = row_count[g], off = row_offset[g];
  const int slot = g / s.num_ranks, src = g % s.num_ranks, kb = s.hidden / kScaleBlock;
  const float* block = x_scale + slot * o.xs_slot_stride + src * o.xs_src_stride;
  for (int j = blockIdx.y; j < n; j += gridDim.y)
    for (int c = threadIdx.x; c < kb; c += blockDim.x)
      xs[int64_t(off + j) * kb + c] = block[j * o.xs_row_stride + c * o.xs_col_stride];
}

// h13 [rows, 2I] bf16 -> hq [rows, I] e4m3 and hs [rows, I/128] float32. Half a warp per (row, 128
// channels), eight channels per lane (one 16-byte load of gate and one of up, one 8-byte store): h =
// silu(gate) * up in float32, then eep.fp8.quantize_rows' arithmetic: scale = amax / 448 (1 for an
// all-zero block), value = round-to-nearest-even(h / scale) saturated. Rows past the device-side total
// are skipped.
__global__ void fp8_swiglu_quant_kernel(const __nv_bfloat16* __restrict__ h13, uint8_t* __restrict__ hq,
                                        float* __restrict__ hs, const int* __restrict__ total_rows, int inter) {
  constexpr int kLanesPerUnit = kScaleBlock / 8;
  const int lane = threadIdx.x % kLanesPerUnit;
  const int blocks_per_row = inter / kScaleBlock;
  const int64_t num_units = int64_t(*total_rows) * blocks_per_row;
  const int64_t units_per_grid = int64_t(gridDim.x) * (blockDim.x / kLanesPerUnit);
  const int64_t first = blockIdx.x * int64_t(blockDim.x / kLanesPerUnit) + threadIdx.x / kLanesPerUnit;
  // every lane of a warp runs the same number of iterations (units_per_grid is a multiple of two
  // half-warps), so the shuffles below always see both halves; a half past the end computes nothing
  for (int64_t base = first - (threadIdx.x / kLanesPerUnit) % 2; base < num_units; base += units_per_grid) {
    const int64_t unit = base + (threadIdx.x / kLanesPerUnit) % 2;
    const bool live = unit < num_units;
    const int64_t row = live ? unit / blocks_per_row : 0;
    const int col = int(live ? unit % blocks_per_row : 0) * kScaleBlock + lane * 8;
    uint4 g8 = make_uint4(0, 0, 0, 0), u8 = g8;
    if (live) {
      g8 = *reinterpret_cast<const uint4*>(h13 + row * 2 * inter + col);
      u8 = *reinterpret_cast<const uint4*>(h13 + row * 2 * inter + inter + col);
    }
    const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&g8);
    const __nv_bfloat162* u2 = reinterpret_cast<const __nv_bfloat162*>(&u8);
    float h[8];
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 g = __bfloat1622float2(g2[i]);
      const float2 u = __bfloat1622float2(u2[i]);
      h[2 * i] = __fdiv_rn(g.x, 1.f + expf(-g.x)) * u.x;
      h[2 * i + 1] = __fdiv_rn(g.y, 1.f + expf(-g.y)) * u.y;
      amax = fmaxf(amax, fmaxf(fabsf(h[2 * i]), fabsf(h[2 * i + 1])));
    }
#pragma unroll
    for (int d = kLanesPerUnit / 2; d > 0; d >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
    if (!live) continue;
    const float scale = amax > 0.f ? __fdiv_rn(amax, 448.f) : 1.f;
    uint32_t words[2];
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      const __nv_fp8x2_storage_t lo = __nv_cvt_float2_to_fp8x2(
          make_float2(__fdiv_rn(h[4 * w], scale), __fdiv_rn(h[4 * w + 1], scale)), __NV_SATFINITE, __NV_E4M3);
      const __nv_fp8x2_storage_t hi = __nv_cvt_float2_to_fp8x2(
          make_float2(__fdiv_rn(h[4 * w + 2], scale), __fdiv_rn(h[4 * w + 3], scale)), __NV_SATFINITE, __NV_E4M3);
      words[w] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
    *reinterpret_cast<uint2*>(hq + row * inter + col) = make_uint2(words[0], words[1]);
    if (lane == 0) hs[row * blocks_per_row + col / kScaleBlock] = scale;
  }
}

// Per-slot groups: GEMM2's compact bf16 rows into the output receive layout.
__global__ void fp8_scatter_kernel(__nv_bfloat16* out, const __nv_bfloat16* yc, const char* plan, StageShape s,
                                   Fp8Operands o) {
  const int num_blocks = s.slots_per_rank * s.num_ranks;
  const int* row_offset = reinterpret_cast<const int*>(plan + fp8_row_offset_offset(num_blocks));
  const int* row_count = reinterpret_cast<const int*>(plan + fp8_row_count_offset(num_blocks));
  const int64_t e = sizeof(__nv_bfloat16);
  copy_block_rows(reinterpret_cast<char*>(out), const_cast<char*>(reinterpret_cast<const char*>(yc)), row_count,
                  row_offset, s, o.out_slot_stride * e, o.out_src_stride * e, o.out_row_stride * e, int(s.hidden * e),
                  false);
}

inline int launch_status(const char* what, char* err, size_t err_len) {
  cudaError_t ce = cudaGetLastError();
  if (ce != cudaSuccess) {
    snprintf(err, err_len, "%s: %s", what, cudaGetErrorString(ce));
    return -int(ce);
  }
  return 0;
}

inline dim3 row_grid(const StageShape& s) {
  return dim3(s.slots_per_rank * s.num_ranks, s.max_tokens_per_rank < 16 ? s.max_tokens_per_rank : 16);
}

}  // namespace eep_gemm

extern "C" size_t eep_fp8_stage_plan_nbytes(int num_blocks) { return eep_gemm::fp8_plan_nbytes(num_blocks); }

extern "C" size_t eep_fp8_stage_plan_gemm_offset(int num_groups, int which) {
  return which == 1 ? 0 : eep_gemm::scaled_plan_nbytes_one(num_groups);
}

extern "C" size_t eep_fp8_stage_total_rows_offset(int num_blocks) { return eep_gemm::fp8_total_rows_offset(num_blocks); }

extern "C" int eep_fp8_stage_setup(const int* count, const eep_gemm::StageShape* shape,
                                   const eep_gemm::Fp8Operands* operands, const void* x, const float* x_scale,
                                   const void* w13, const float* w13_scale, const void* w2, const float* w2_scale,
                                   void* h13, void* hq, float* hs, float* xs, void* out, char* plan, int swap1,
                                   int swap2, int per_slot, void* xc, void* yc, cudaStream_t stream, char* err,
                                   size_t err_len) {
  const int num_blocks = shape->slots_per_rank * shape->num_ranks;
  int threads = 32;
  while (threads < num_blocks && threads < eep_gemm::kMaxSetupThreads) threads *= 2;
  cudaMemsetAsync(plan + eep_gemm::fp8_total_rows_offset(num_blocks), 0, 8, stream);  // total rows, error word
  eep_gemm::fp8_setup_kernel<<<1, threads, 0, stream>>>(
      count, *shape, *operands, static_cast<const uint8_t*>(x), x_scale, static_cast<const uint8_t*>(w13), w13_scale,
      static_cast<const uint8_t*>(w2), w2_scale, static_cast<__nv_bfloat16*>(h13), static_cast<uint8_t*>(hq), hs, xs,
      static_cast<__nv_bfloat16*>(out), plan, swap1 != 0, swap2 != 0, per_slot != 0, static_cast<uint8_t*>(xc),
      static_cast<__nv_bfloat16*>(yc));
  return eep_gemm::launch_status("fp8_setup_kernel", err, err_len);
}

extern "C" int eep_fp8_gather(const void* x, const float* x_scale, void* xc, float* xs, const char* plan,
                              const eep_gemm::StageShape* shape, const eep_gemm::Fp8Operands* operands, int rows,
                              int scales, cudaStream_t stream, char* err, size_t err_len) {
  eep_gemm::fp8_gather_kernel<<<eep_gemm::row_grid(*shape), 128, 0, stream>>>(
      static_cast<const uint8_t*>(x), x_scale, static_cast<uint8_t*>(xc), xs, plan, *shape, *operands, rows != 0,
      scales != 0);
  return eep_gemm::launch_status("fp8_gather_kernel", err, err_len);
}

extern "C" int eep_fp8_swiglu_quant(const void* h13, void* hq, float* hs, const char* plan, int num_blocks,
                                    int capacity_rows, int inter, int sm_count, cudaStream_t stream, char* err,
                                    size_t err_len) {
  const int* total = reinterpret_cast<const int*>(plan + eep_gemm::fp8_total_rows_offset(num_blocks));
  const long long units = (long long)capacity_rows * (inter / eep_gemm::kScaleBlock);
  long long blocks = (units + 15) / 16;  // 16 half-warps per block, one (row, 128 channels) each
  if (blocks > 8LL * sm_count) blocks = 8LL * sm_count;
  if (blocks < 1) blocks = 1;
  eep_gemm::fp8_swiglu_quant_kernel<<<int(blocks), 256, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(h13), static_cast<uint8_t*>(hq), hs, total, inter);
  return eep_gemm::launch_status("fp8_swiglu_quant_kernel", err, err_len);
}

extern "C" int eep_fp8_scatter(void* out, const void* yc, const char* plan, const eep_gemm::StageShape* shape,
                               const eep_gemm::Fp8Operands* operands, cudaStream_t stream, char* err, size_t err_len) {
  eep_gemm::fp8_scatter_kernel<<<eep_gemm::row_grid(*shape), 128, 0, stream>>>(
      static_cast<__nv_bfloat16*>(out), static_cast<const __nv_bfloat16*>(yc), plan, *shape, *operands);
  return eep_gemm::launch_status("fp8_scatter_kernel", err, err_len);
}
