// Host-only check (no GPU) of the assumption the SwiGLU epilogue rests on: for every thread of the
// kernel's TiledMma, the accumulator elements swiglu_gemm.cuh pairs as (gate, up) sit at GEMM
// coordinates (m, n)/(m, n+1) with n even (not swapped) or (m, n)/(m+8, n) with m % 16 < 8 (swapped),
// and their outputs cover the half-width tile exactly once. Built and run by
// tests/test_fused_gemm_swiglu.py; prints "ok <tile>" per checked tile, exits non-zero on a mismatch.
#define EEP_SWIGLU_NO_ENTRY_POINTS
#include <cstdio>
#include <vector>

#include "swiglu_gemm.cuh"

template <int TM, int TN, int TK, int Schedule, bool Swap>
int check_tile() {
  using namespace cute;
  using G = eep_gemm::SwigluGroupedGemm<TM, TN, TK, 1, 1, Schedule, Swap>;
  using TiledMma = typename G::Mainloop::TiledMma;
  TiledMma mma;
  auto tile = make_shape(Int<TM>{}, Int<TN>{});
  auto acc = partition_fragment_C(mma, tile);  // the shape the kernel's accumulators have
  static_assert(size<0, 0>(decltype(acc.layout()){}) == 2 && size<0, 1>(decltype(acc.layout()){}) == 2, "layout");
  const int out_m = Swap ? TM / 2 : TM, out_n = Swap ? TN : TN / 2;
  std::vector<int> hits(out_m * out_n, 0);
  int bad = 0;
  for (int t = 0; t < int(size(mma)); ++t) {
    auto tc = mma.get_thread_slice(t).partition_C(make_identity_tensor(tile));
    if (size(tc) != size(acc)) { std::printf("thread %d: %d coordinates vs %d accumulators\n", t, int(size(tc)), int(size(acc))); return 1; }
    for (int mi = 0; mi < int(size<1>(acc)); ++mi)
      for (int ni = 0; ni < int(size<2>(acc)); ++ni)
        for (int v = 0; v < int(size<0, 2>(acc)); ++v)
          for (int q = 0; q < 2; ++q) {
            auto g = tc(eep_gemm::swiglu_gate_index<Swap>(q, v, mi, ni));
            auto u = tc(eep_gemm::swiglu_up_index<Swap>(q, v, mi, ni));
            const int gm = get<0>(g), gn = get<1>(g), um = get<0>(u), un = get<1>(u);
            const bool paired = Swap ? (un == gn && um == gm + 8 && gm % 16 < 8) : (um == gm && un == gn + 1 && gn % 2 == 0);
            if (!paired && bad++ < 5) std::printf("thread %d: gate (%d,%d) up (%d,%d) not a pair\n", t, gm, gn, um, un);
            hits[eep_gemm::swiglu_out_m<Swap>(gm) * out_n + eep_gemm::swiglu_out_n<Swap>(gn)] += 1;
          }
  }
  for (int i = 0; i < out_m * out_n; ++i)
    if (hits[i] != 1 && bad++ < 10) std::printf("output (%d,%d) written %d times\n", i / out_n, i % out_n, hits[i]);
  if (bad) return 1;
  std::printf("ok %dx%dx%d schedule %d swap %d: %d threads\n", TM, TN, TK, Schedule, int(Swap), int(size(mma)));
  return 0;
}

int main() {
  int rc = 0;
  rc |= check_tile<128, 256, 64, 0, false>();  // SWIGLU_CONFIGS
  rc |= check_tile<128, 32, 128, 0, true>();
  rc |= check_tile<128, 128, 64, 0, false>();  // other tiles the template accepts
  rc |= check_tile<64, 32, 128, 1, true>();
  rc |= check_tile<64, 128, 64, 1, false>();
  return rc;
}
