// What every expert GEMM of the library shares: one CUTLASS 3.x SM90 pointer-array grouped GEMM
// (TMA loads, warp-specialized persistent kernel, fp32 accumulation), its arguments and launch
// from the stage's device plan (expert_gemm.cuh: problem sizes, pointers and leading dimensions per
// group, plus the block-scale pointers of FP8 GEMMs), the plain bf16 TMA-store epilogue, and the
// two C entry points a generated translation unit exports. The plain bf16 kernels (grouped_gemm.cuh)
// and GEMM1 with SwiGLU in its epilogue (swiglu_gemm.cuh) differ only in the epilogue policy they
// pass; the FP8 kernels (fp8_gemm.cuh) in their mainloop.
#pragma once

#include <cstdio>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "expert_gemm.cuh"

namespace eep_gemm {

// void C: no source operand is read, the epilogue only stores D = acc in bf16 (TMA store).
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

// Arguments and launch of one grouped GEMM whose A and B are `Element` (bf16, or float_e4m3 with
// kBlockScaled: the plan then carries each group's scale pointers too, see ScalePlan) and whose D is bf16.
template <class Gemm, class ProblemShape, class Element, class StrideA, class StrideB, class StrideD,
          bool kBlockScaled = false>
struct GroupedLaunch {
  // The plan stores each stride as its one dynamic int64 (the leading dimension).
  static_assert(sizeof(StrideA) == 8 && sizeof(StrideB) == 8 && sizeof(StrideD) == 8, "stride is not one int64");
  static_assert(sizeof(typename ProblemShape::UnderlyingProblemShape) == 12, "problem shape is not 3 x int32");

  static typename Gemm::GemmKernel::MainloopArguments mainloop(const GemmPlan& p, char* plan_bytes, int num_groups) {
    if constexpr (kBlockScaled) {
      // The scale layouts follow each group's problem shape inside the kernel; CUTLASS only keeps
      // these (unused) layout arrays, so none is passed.
      ScalePlan q = scale_plan_at(plan_bytes, num_groups);
      return {reinterpret_cast<const Element**>(p.ptr_a), reinterpret_cast<StrideA*>(p.ld_a),
              reinterpret_cast<const Element**>(p.ptr_b), reinterpret_cast<StrideB*>(p.ld_b),
              q.ptr_sfa, nullptr, q.ptr_sfb, nullptr};
    } else {
      return {reinterpret_cast<const Element**>(p.ptr_a), reinterpret_cast<StrideA*>(p.ld_a),
              reinterpret_cast<const Element**>(p.ptr_b), reinterpret_cast<StrideB*>(p.ld_b)};
    }
  }

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
        mainloop(p, plan_bytes, num_groups),
        {fusion, nullptr, nullptr, reinterpret_cast<cutlass::bfloat16_t**>(p.ptr_d), reinterpret_cast<StrideD*>(p.ld_d)},
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

// K-major A [M, K] (tokens, or weights when swapped) and B (a row-major [N, K] matrix), D row-major,
// or column-major when Swap ("weights on M": D^T = W X^T, for blocks of a few tokens).
// EpiloguePolicy::Collective<TileShape, ClusterShape, LayoutD, Schedule, Swap> is the collective epilogue.
template <int TileM, int TileN, int TileK, int ClusterM, int ClusterN, int Schedule, bool Swap, class EpiloguePolicy>
struct ExpertGroupedGemm {
  using Element = cutlass::bfloat16_t;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cute::conditional_t<Swap, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  static constexpr int kAlign = 8;  // 16 bytes of bf16: what TMA needs
  using TileShape = cute::Shape<cute::Int<TileM>, cute::Int<TileN>, cute::Int<TileK>>;
  using ClusterShape = cute::Shape<cute::Int<ClusterM>, cute::Int<ClusterN>, cute::_1>;
  using KernelSchedule = cute::conditional_t<Schedule == 0, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative,
                                             cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong>;
  using Epilogue = typename EpiloguePolicy::template Collective<TileShape, ClusterShape, LayoutD, Schedule, Swap>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element, LayoutB*, kAlign,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using Launch = GroupedLaunch<Gemm, ProblemShape, Element, typename Kernel::InternalStrideA,
                               typename Kernel::InternalStrideB, typename Kernel::InternalStrideD>;
};

}  // namespace eep_gemm

// The C entry points of one configuration (found by name through ctypes): `<EEP_GEMM_NAME>_workspace`
// and `<EEP_GEMM_NAME>_run`, for the GEMM type `GemmT` (which has a `Launch` member type).
#define EEP_CAT2(a, b) a##b
#define EEP_CAT(a, b) EEP_CAT2(a, b)
#define EEP_GEMM_ENTRY_POINTS(GemmT)                                                                          \
  extern "C" size_t EEP_CAT(EEP_GEMM_NAME, _workspace)(int num_groups, int device, int sm_count) {           \
    return GemmT::Launch::workspace_nbytes(num_groups, device, sm_count);                                   \
  }                                                                                                          \
  extern "C" int EEP_CAT(EEP_GEMM_NAME, _run)(int num_groups, char* plan_bytes, void* workspace, int device, \
                                              int sm_count, cudaStream_t stream, char* err, size_t err_len) { \
    return GemmT::Launch::run(num_groups, plan_bytes, workspace, device, sm_count, stream, err, err_len);   \
  }
