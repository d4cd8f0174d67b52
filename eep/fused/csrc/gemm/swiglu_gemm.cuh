// GEMM1 with SwiGLU in its epilogue: h = silu(x @ Wg^T) * (x @ Wu^T), written at half the width of
// the accumulator tile, straight from registers (no shared memory, no TMA store).
//
// Opt-in (GemmConfig(swiglu=True)); the default kernels of grouped_gemm.cuh are untouched. A generated
// unit defines the same macros as for grouped_gemm.cuh (EEP_GEMM_NAME, EEP_TILE_*, EEP_CLUSTER_*,
// EEP_SCHEDULE, EEP_SWAP) and includes this file instead.
//
// Weight layout. The kernel is an ordinary grouped GEMM over an interleaved w13 whose gate row j and
// up row j land in the SAME thread's accumulator fragment. The SM90 wgmma accumulator of a 64xN atom
// (cute CLayout_64xN) gives each thread the value mode ((2, 2, N/8)): columns (n, n+1) of rows
// (r, r+8) per 8-column chunk. Hence:
//   not swapped (weight rows on N): pairs are columns (n, n+1)  -> interleave period 1:
//       w13i row 2j = gate j, row 2j+1 = up j
//   swapped (weight rows on M):     pairs are rows (r, r+8)     -> interleave period 8:
//       w13i row 16b + t = gate 8b + t, row 16b + 8 + t = up 8b + t   (t < 8)
// (eep.fused.gemm.cutlass_stage.interleave_gate_up builds both.) The problem shape stays the GEMM's
// (tokens x 2I x H, or 2I x tokens x H swapped); the plan's D pointer and leading dimension describe h,
// the half-width output (the stage patches them after setup: swiglu_stage.cu).
//
// Numerics match the unfused path (GEMM1 -> bf16 h13 -> swiglu_kernel): each accumulator is rounded
// to bf16 first, then silu(g) * u is computed in float with the same expression and rounded to bf16.
#pragma once

#include <cstdio>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/default_epilogue_array.hpp"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "grouped_gemm_base.cuh"

namespace eep_gemm {

// Same expression as stage.cu's swiglu_kernel, so fused and unfused results agree bit for bit
// whenever the GEMM accumulators do.
__device__ __forceinline__ float swiglu_silu(float v) { return v / (1.f + __expf(-v)); }

// Which accumulator elements pair up, and where their product goes (shared with the host-side layout
// check tests/swiglu_layout_check.cu). The accumulator / coordinate index is ((c, r, v), mi, ni):
// c the column of a column pair, r the row half (+8), v the 8-column chunk.
template <bool Swap>
CUTE_HOST_DEVICE auto swiglu_gate_index(int q, int v, int mi, int ni) {
  // Not swapped: gate/up are the column pair (c=0, c=1) of row half q; swapped: the row halves
  // (r=0, r=1) of column q.
  return Swap ? cute::make_coord(cute::make_coord(q, 0, v), mi, ni) : cute::make_coord(cute::make_coord(0, q, v), mi, ni);
}

template <bool Swap>
CUTE_HOST_DEVICE auto swiglu_up_index(int q, int v, int mi, int ni) {
  return Swap ? cute::make_coord(cute::make_coord(q, 1, v), mi, ni) : cute::make_coord(cute::make_coord(1, q, v), mi, ni);
}

// (row, column) of h for the gate element at (m, n) of the GEMM problem: the weight dimension halves.
template <bool Swap>
CUTE_HOST_DEVICE int swiglu_out_m(int m) { return Swap ? (m >> 4) * 8 + (m & 7) : m; }
template <bool Swap>
CUTE_HOST_DEVICE int swiglu_out_n(int n) { return Swap ? n : n >> 1; }

// The register-to-global epilogue of CUTLASS's DefaultEpilogueArray (ptr-array, no smem), with the
// elementwise store replaced by the pairwise SwiGLU store. Arguments/Params, workspace and
// can_implement are inherited, so the host side is the stock one; only operator() differs.
template <class StrideD_, bool Swap>
class SwigluEpilogueArray
    : public cutlass::epilogue::collective::DefaultEpilogueArray<
          void, StrideD_, StrideD_,
          cutlass::epilogue::thread::LinearCombination<cutlass::bfloat16_t, 1, float, float,
                                                       cutlass::epilogue::thread::ScaleType::OnlyAlphaScaling,
                                                       cutlass::FloatRoundStyle::round_to_nearest, cutlass::bfloat16_t>,
          cutlass::epilogue::PtrArrayNoSmemWarpSpecialized> {
 public:
  using Base = cutlass::epilogue::collective::DefaultEpilogueArray<
      void, StrideD_, StrideD_,
      cutlass::epilogue::thread::LinearCombination<cutlass::bfloat16_t, 1, float, float,
                                                   cutlass::epilogue::thread::ScaleType::OnlyAlphaScaling,
                                                   cutlass::FloatRoundStyle::round_to_nearest, cutlass::bfloat16_t>,
      cutlass::epilogue::PtrArrayNoSmemWarpSpecialized>;
  using typename Base::Params;
  using typename Base::InternalStrideD;

  CUTLASS_HOST_DEVICE SwigluEpilogueArray(Params const& params) : Base(params), ptr_d_(params.ptr_D), ld_d_(params.dD) {}

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_MNK,
                                 BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    using namespace cute;
    static_assert(is_static<FrgLayout>::value, "accumulator layout must be static");
    // The pairing below relies on the wgmma accumulator value mode ((2 columns, 2 row halves, N/8), M, N).
    static_assert(rank(FrgLayout{}) == 3 && rank<0>(FrgLayout{}) == 3, "unexpected accumulator layout");
    static_assert(size<0, 0>(FrgLayout{}) == 2 && size<0, 1>(FrgLayout{}) == 2, "unexpected accumulator layout");

    const int M = int(get<0>(problem_shape_mnkl));
    const int N = int(get<1>(problem_shape_mnkl));
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord_mnkl;
    InternalStrideD stride = ld_d_[l_coord];
    const int64_t s0 = int64_t(get<0>(stride)), s1 = int64_t(get<1>(stride));
    cutlass::bfloat16_t* d = ptr_d_[l_coord];

    // Coordinates of each accumulator in the (M, N) GEMM problem, partitioned like the accumulators.
    Tensor cD = local_tile(make_identity_tensor(make_shape(M, N)), take<0, 2>(blk_shape_MNK),
                           make_coord(m_coord, n_coord));
    Tensor tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(cD);  // ((2,2,V), MMA_M, MMA_N)
    CUTE_STATIC_ASSERT_V(size(tCcD) == size(accumulators), "coordinate / accumulator mismatch");

    CUTLASS_PRAGMA_UNROLL
    for (int mi = 0; mi < size<1>(accumulators); ++mi) {
      CUTLASS_PRAGMA_UNROLL
      for (int ni = 0; ni < size<2>(accumulators); ++ni) {
        CUTLASS_PRAGMA_UNROLL
        for (int v = 0; v < size<0, 2>(accumulators); ++v) {
          CUTLASS_PRAGMA_UNROLL
          for (int q = 0; q < 2; ++q) {
            const auto gi = swiglu_gate_index<Swap>(q, v, mi, ni);
            const auto ui = swiglu_up_index<Swap>(q, v, mi, ni);
            const auto crd = tCcD(gi);
            const int m = int(get<0>(crd)), n = int(get<1>(crd));
            // The partner is in bounds whenever the gate element is: 2I is a multiple of 16.
            if (m < M && n < N) {
              const float g = float(__float2bfloat16_rn(accumulators(gi)));  // the rounding h13 would apply
              const float u = float(__float2bfloat16_rn(accumulators(ui)));
              const __nv_bfloat16 hval = __float2bfloat16_rn(swiglu_silu(g) * u);
              const int64_t om = swiglu_out_m<Swap>(m), on = swiglu_out_n<Swap>(n);
              reinterpret_cast<__nv_bfloat16*>(d)[om * s0 + on * s1] = hval;
            }
          }
        }
      }
    }
  }

 private:
  cutlass::bfloat16_t** ptr_d_;
  InternalStrideD* ld_d_;
};

struct SwigluEpiloguePolicy {
  template <class TileShape, class ClusterShape, class LayoutD, int Schedule, bool Swap>
  using Collective = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
      SwigluEpilogueArray<cutlass::detail::TagToStrideC_t<LayoutD*>, Swap>>;
};

template <int TileM, int TileN, int TileK, int ClusterM, int ClusterN, int Schedule, bool Swap>
struct SwigluGroupedGemm
    : ExpertGroupedGemm<TileM, TileN, TileK, ClusterM, ClusterN, Schedule, Swap, SwigluEpiloguePolicy> {
  // The pairing of gate and up needs both in one thread: whole 16-row / 2-column pairs per tile.
  static_assert(TileM % 16 == 0 && TileN % 16 == 0, "tile must hold whole gate/up pairs");
};

}  // namespace eep_gemm

#ifndef EEP_SWIGLU_NO_ENTRY_POINTS  // defined by the host-side layout check, which needs only the types
using EepThisGemm = eep_gemm::SwigluGroupedGemm<EEP_TILE_M, EEP_TILE_N, EEP_TILE_K, EEP_CLUSTER_M, EEP_CLUSTER_N,
                                                EEP_SCHEDULE, EEP_SWAP>;
EEP_GEMM_ENTRY_POINTS(EepThisGemm)
#endif  // EEP_SWIGLU_NO_ENTRY_POINTS
