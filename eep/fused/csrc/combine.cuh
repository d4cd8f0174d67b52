// Low-latency combine, two launches per step:
//   eep_combine_send   (on every expert rank) pushes the expert outputs of each (slot, source)
//                      block home into the source's comb_x [num_ranks, S, M, hidden] region, then
//                      its last block raises flags and waits a bounded time for every active peer;
//   eep_combine_reduce (on every source rank) sums the top-k contributions with float32
//                      accumulation in k order (as eep.reference.combine does), skipping NO_EXPERT,
//                      copies never sent, inactive ranks and peers that missed the deadline.
#pragma once
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(512) eep_combine_send(const EepParams p) {
  extern __shared__ int s_dyn[];  // s_rows[S*R], s_start[S*R + 1]
  __shared__ int s_active[EEP_MAX_RANKS];
  __shared__ int s_warp[32];
  __shared__ int s_last;

  const int S = (int)p.slots_per_rank, R = (int)p.num_ranks, M = (int)p.max_tokens;
  const int me = (int)p.my_rank, num_pairs = S * R;
  EepCtrl* ctrl = (EepCtrl*)p.ctrl;
  const u64* peer = (const u64*)p.peer_base;
  const u64 seq = *(volatile u64*)&ctrl->combine_seq + 1;
  int* s_rows = s_dyn;
  int* s_start = s_dyn + num_pairs;

  eep_load_active((const int*)p.active, s_active, R);
  __syncthreads();
  const int* vis_count = (const int*)p.vis_count;
  for (int pair = threadIdx.x; pair < num_pairs; pair += blockDim.x)
    s_rows[pair] = eep_rank_active(s_active, pair % R) ? min(max(vis_count[pair], 0), M) : 0;
  __syncthreads();
  eep_block_exclusive_scan(s_rows, s_start, num_pairs, s_warp);
  const int num_rows = s_start[num_pairs];

  const int lane = threadIdx.x & 31, warps_per_block = blockDim.x >> 5;
  const EepVec* y = (const EepVec*)p.x;
  for (int item = blockIdx.x * warps_per_block + (threadIdx.x >> 5); item < num_rows * EEP_CHUNKS_PER_ROW;
       item += gridDim.x * warps_per_block) {
    const int r = item / EEP_CHUNKS_PER_ROW, chunk = item % EEP_CHUNKS_PER_ROW;
    int lo = 0, hi = num_pairs - 1;  // last pair whose start <= r
    while (lo < hi) {
      int mid = (lo + hi + 1) >> 1;
      if (s_start[mid] <= r) lo = mid; else hi = mid - 1;
    }
    const int pair = lo, row = r - s_start[pair];
    const int local = pair / R, src = pair % R;
    const EepVec* from = y + ((u64)pair * M + row) * EEP_VEC_PER_ROW;
    EepVec* to = (EepVec*)(peer[src] + p.off_comb_x) + (((u64)me * S + local) * M + row) * EEP_VEC_PER_ROW;
    eep_copy_chunk<EEP_VEC_PER_ROW>(to, from, chunk, lane);
  }

  if (!eep_arrive_last(&ctrl->combine_arrived, &s_last)) return;
  eep_signal_and_wait(ctrl, peer, me, R, s_active, p.off_combine_flag, seq, ctrl->combine_ok, nullptr);
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    *(volatile u64*)&ctrl->combine_seq = seq;
  }
}

extern "C" __global__ void __launch_bounds__(512) eep_combine_reduce(const EepParams p) {
  __shared__ int s_use[EEP_MAX_RANKS];  // rank active and its outputs arrived
  const int S = (int)p.slots_per_rank, R = (int)p.num_ranks, M = (int)p.max_tokens;
  const int K = (int)p.top_k, T = (int)p.num_tokens, num_slots = S * R;
  const EepCtrl* ctrl = (const EepCtrl*)p.ctrl;
  eep_load_arrived(ctrl, (const int*)p.active, s_use, R);
  __syncthreads();
  const i64* phys = (const i64*)p.phys;
  const int* handle_pos = (const int*)p.handle_pos;
  const float* weights = (const float*)p.weights;
  const EepVec* comb_x = (const EepVec*)(((const u64*)p.peer_base)[p.my_rank] + p.off_comb_x);
  EepVec* out = (EepVec*)p.out;
  for (int item = blockIdx.x * blockDim.x + threadIdx.x; item < T * EEP_VEC_PER_ROW;
       item += gridDim.x * blockDim.x) {
    const int token = item / EEP_VEC_PER_ROW, v = item % EEP_VEC_PER_ROW;
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.f;
    for (int k0 = 0; k0 < K; k0 += 4) {  // four independent 16-byte loads in flight, summed in k order
      EepVec val[4];
      float w[4];
      bool use[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int k = k0 + u, e = token * K + k;
        use[u] = false;
        if (k < K) {
          const i64 slot = phys[e];
          const int row = handle_pos[e];
          if (slot >= 0 && slot < num_slots && row >= 0 && row < M && s_use[(int)slot / S]) {
            use[u] = true;
            w[u] = weights[e];
            val[u] = comb_x[(((u64)((int)slot / S) * S + (int)slot % S) * M + row) * EEP_VEC_PER_ROW + v];
          }
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (use[u]) eep_accumulate(acc, w[u], val[u]);
    }
    out[item] = eep_pack_bf16x8(acc);
  }
}
