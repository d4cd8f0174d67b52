// One CUTLASS 3.x SM90 pointer-array grouped GEMM (TMA loads, warp-specialized persistent kernel),
// bf16 x bf16 -> fp32 accumulate -> bf16, K-major A and B. A generated translation unit defines
// EEP_GEMM_NAME, EEP_TILE_{M,N,K}, EEP_CLUSTER_{M,N}, EEP_SCHEDULE (0 cooperative, 1 pingpong) and
// EEP_SWAP (D column-major: the "weights on M" form), then includes this file.
#pragma once

#include "grouped_gemm_base.cuh"

namespace eep_gemm {

template <int TileM, int TileN, int TileK, int ClusterM, int ClusterN, int Schedule, bool Swap>
using GroupedGemm = ExpertGroupedGemm<TileM, TileN, TileK, ClusterM, ClusterN, Schedule, Swap, PlainEpilogue>;

}  // namespace eep_gemm

using EepThisGemm = eep_gemm::GroupedGemm<EEP_TILE_M, EEP_TILE_N, EEP_TILE_K, EEP_CLUSTER_M, EEP_CLUSTER_N,
                                          EEP_SCHEDULE, EEP_SWAP>;
EEP_GEMM_ENTRY_POINTS(EepThisGemm)
