// One CUTLASS 3.x SM90 pointer-array grouped GEMM (TMA loads, warp-specialized persistent kernel),
// bf16 x bf16 -> fp32 accumulate -> bf16, K-major A and B. A generated translation unit defines
// EEP_GEMM_NAME, EEP_TILE_{M,N,K}, EEP_CLUSTER_{M,N}, EEP_SCHEDULE (0 cooperative, 1 pingpong) and
// EEP_SWAP (D column-major: the "weights on M" form), then includes this file.
#pragma once

#include <cstdio>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "expert_gemm.cuh"

namespace eep_gemm {

template <int TileM, int TileN, int TileK, int ClusterM, int ClusterN, int Schedule, bool Swap>
struct GroupedGemm {
  using Element = cutlass::bfloat16_t;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using LayoutA = cutlass::layout::RowMajor;     // [M, K], K contiguous
  using LayoutB = cutlass::layout::ColumnMajor;  // [K, N] with K contiguous, i.e. a row-major [N, K] weight
  using LayoutD = cute::conditional_t<Swap, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  static constexpr int kAlign = 8;  // 16 bytes of bf16: what TMA needs
  using TileShape = cute::Shape<cute::Int<TileM>, cute::Int<TileN>, cute::Int<TileK>>;
  using ClusterShape = cute::Shape<cute::Int<ClusterM>, cute::Int<ClusterN>, cute::_1>;
  using KernelSchedule = cute::conditional_t<Schedule == 0, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative,
                                             cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong>;
  using EpilogueSchedule = cute::conditional_t<Schedule == 0, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
                                               cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>;

  // void C: no source operand is read, the epilogue only stores D = acc.
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlign, Element, LayoutD*, kAlign, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element, LayoutB*, kAlign,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  // The plan stores each stride as its one dynamic int64 (the leading dimension).
  static_assert(sizeof(StrideA) == 8 && sizeof(StrideB) == 8 && sizeof(StrideD) == 8, "stride is not one int64");
  static_assert(sizeof(typename ProblemShape::UnderlyingProblemShape) == 12, "problem shape is not 3 x int32");

  static typename Gemm::Arguments arguments(int num_groups, char* plan_bytes, int device, int sm_count) {
    GemmPlan p = plan_at(plan_bytes, num_groups);
    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    hw.sm_count = sm_count;
    typename Gemm::Arguments args;
    decltype(args.epilogue.thread) fusion;
    fusion.alpha = 1.f;
    fusion.beta = 0.f;
    args = typename Gemm::Arguments{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {num_groups, reinterpret_cast<typename ProblemShape::UnderlyingProblemShape*>(p.problems), nullptr},
        {reinterpret_cast<const Element**>(p.ptr_a), reinterpret_cast<StrideA*>(p.ld_a),
         reinterpret_cast<const Element**>(p.ptr_b), reinterpret_cast<StrideB*>(p.ld_b)},
        {fusion, nullptr, nullptr, reinterpret_cast<Element**>(p.ptr_d), reinterpret_cast<StrideD*>(p.ld_d)},
        hw};
    return args;
  }

  static size_t workspace_nbytes(int num_groups, int device, int sm_count) {
    return Gemm::get_workspace_size(arguments(num_groups, nullptr, device, sm_count));
  }

  // Returns 0, or a cutlass::Status / cudaError_t code (negated) with the message in `err`.
  static int run(int num_groups, char* plan_bytes, void* workspace, int device, int sm_count, cudaStream_t stream,
                 char* err, size_t err_len) {
    auto args = arguments(num_groups, plan_bytes, device, sm_count);
    Gemm gemm;
    cutlass::Status st = gemm.can_implement(args);
    if (st != cutlass::Status::kSuccess) {
      snprintf(err, err_len, "can_implement: %s", cutlass::cutlassGetStatusString(st));
      return int(st);
    }
    st = gemm.initialize(args, workspace, stream);
    if (st != cutlass::Status::kSuccess) {
      snprintf(err, err_len, "initialize: %s", cutlass::cutlassGetStatusString(st));
      return int(st);
    }
    st = gemm.run(stream);
    cudaError_t ce = cudaGetLastError();
    if (st != cutlass::Status::kSuccess || ce != cudaSuccess) {
      snprintf(err, err_len, "run: %s / %s", cutlass::cutlassGetStatusString(st), cudaGetErrorString(ce));
      return st != cutlass::Status::kSuccess ? int(st) : -int(ce);
    }
    return 0;
  }
};

}  // namespace eep_gemm

// The C entry points of one configuration (found by name through ctypes).
#define EEP_CAT2(a, b) a##b
#define EEP_CAT(a, b) EEP_CAT2(a, b)
using EepThisGemm = eep_gemm::GroupedGemm<EEP_TILE_M, EEP_TILE_N, EEP_TILE_K, EEP_CLUSTER_M, EEP_CLUSTER_N,
                                          EEP_SCHEDULE, EEP_SWAP>;

extern "C" size_t EEP_CAT(EEP_GEMM_NAME, _workspace)(int num_groups, int device, int sm_count) {
  return EepThisGemm::workspace_nbytes(num_groups, device, sm_count);
}

extern "C" int EEP_CAT(EEP_GEMM_NAME, _run)(int num_groups, char* plan_bytes, void* workspace, int device,
                                            int sm_count, cudaStream_t stream, char* err, size_t err_len) {
  return EepThisGemm::run(num_groups, plan_bytes, workspace, device, sm_count, stream, err, err_len);
}
