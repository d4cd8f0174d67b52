// One CUTLASS 3.x SM90 pointer-array grouped GEMM (TMA loads, warp-specialized persistent kernel),
// bf16 x bf16 -> fp32 accumulate -> bf16, K-major A and B. A generated translation unit defines
// EEP_GEMM_NAME, EEP_TILE_{M,N,K}, EEP_CLUSTER_{M,N}, EEP_SCHEDULE (0 cooperative, 1 pingpong) and
// EEP_SWAP (D column-major: the "weights on M" form), then includes this file.
#pragma once

#include "cutlass/epilogue/collective/collective_builder.hpp"

#include "grouped_gemm_base.cuh"

namespace eep_gemm {

// void C: no source operand is read, the epilogue only stores D = acc (TMA store).
struct PlainEpilogue {
  template <class TileShape, class ClusterShape, class LayoutD, int Schedule, bool Swap>
  using Collective = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, 8, cutlass::bfloat16_t, LayoutD*,
      8,
      cute::conditional_t<Schedule == 0, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
                          cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>,
      cutlass::epilogue::fusion::LinearCombination<cutlass::bfloat16_t, float, void, float>>::CollectiveOp;
};

template <int TileM, int TileN, int TileK, int ClusterM, int ClusterN, int Schedule, bool Swap>
using GroupedGemm = ExpertGroupedGemm<TileM, TileN, TileK, ClusterM, ClusterN, Schedule, Swap, PlainEpilogue>;

}  // namespace eep_gemm

using EepThisGemm = eep_gemm::GroupedGemm<EEP_TILE_M, EEP_TILE_N, EEP_TILE_K, EEP_CLUSTER_M, EEP_CLUSTER_N,
                                          EEP_SCHEDULE, EEP_SWAP>;
EEP_GEMM_ENTRY_POINTS(EepThisGemm)
