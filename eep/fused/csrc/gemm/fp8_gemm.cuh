// One FP8 expert GEMM: CUTLASS's SM90 pointer-array grouped GEMM with block scales applied in the
// mainloop (KernelPtrArrayTmaWarpSpecialized{Cooperative,Pingpong}FP8Blockwise). A and B are
// float_e4m3 K-major; after every 128 elements of K the tensor-core partial sums are promoted into
// the fp32 accumulator times scale_A x scale_B (the FP8 tensor-core accumulator alone keeps too few
// bits for a long K); D is bf16 through the plain TMA-store epilogue.
//
// Scales are float32 and K-major, 128 wide along K: the token side has one per row (1 x 128, the FP8
// dispatch's format), the weight side one per 128 rows (128 x 128, the checkpoint's weight_scale_inv
// [out/128, in/128] as it is stored). CUTLASS lays each group's scales out from the group's problem
// shape, so a group's token scales must be [tokens, K/128] row-major starting at its first row; the
// plan's ScalePlan gives the per-group pointers. Swap (decode: weights on M, tokens on N) swaps which
// side is A, so the granularities swap with it.
//
// A generated translation unit defines the EEP_* template arguments (as for grouped_gemm.cuh) and
// includes this file.
#pragma once

#include "cutlass/detail/blockwise_scale_layout.hpp"

#include "grouped_gemm_base.cuh"

namespace eep_gemm {

template <int TileM, int TileN, int TileK, int ClusterM, int ClusterN, int Schedule, bool Swap>
struct Fp8ExpertGroupedGemm {
  static_assert(TileK == 128, "one 128-wide scale block per K tile");
  using Element = cutlass::float_e4m3_t;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cute::conditional_t<Swap, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  static constexpr int kAlign = 16;  // 16 bytes of e4m3: what TMA needs
  // Tokens: one scale per row; weights: one per 128 rows. Both K-major, 128 along K.
  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<Swap ? 128 : 1, Swap ? 1 : 128, 128,
                                                                cute::GMMA::Major::K, cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());
  using TileShape = cute::Shape<cute::Int<TileM>, cute::Int<TileN>, cute::Int<TileK>>;
  using ClusterShape = cute::Shape<cute::Int<ClusterM>, cute::Int<ClusterN>, cute::_1>;
  using KernelSchedule = cute::conditional_t<Schedule == 0,
                                             cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                                             cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise>;
  using Epilogue = typename PlainEpilogue::template Collective<TileShape, ClusterShape, LayoutD, Schedule, Swap>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cute::tuple<LayoutA*, LayoutSFA*>, kAlign, Element,
      cute::tuple<LayoutB*, LayoutSFB*>, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using Launch = GroupedLaunch<Gemm, ProblemShape, Element, typename Kernel::InternalStrideA,
                               typename Kernel::InternalStrideB, typename Kernel::InternalStrideD, true>;
};

}  // namespace eep_gemm

using EepThisGemm = eep_gemm::Fp8ExpertGroupedGemm<EEP_TILE_M, EEP_TILE_N, EEP_TILE_K, EEP_CLUSTER_M, EEP_CLUSTER_N,
                                                   EEP_SCHEDULE, EEP_SWAP>;
EEP_GEMM_ENTRY_POINTS(EepThisGemm)
