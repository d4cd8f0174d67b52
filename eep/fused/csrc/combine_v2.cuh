// Kernel set v2, low-latency combine: ONE launch, bit-identical to eep.reference.combine (float32
// mul-then-add of the top-k rows in k order, rounded once).
//
// Blocks [0, num_send_blocks) push: each (slot, source) block's expert rows go home into the
// source's comb_x, for every active source except this rank (num_send_blocks is 0 with one rank).
// Each pushing block then raises its flag in every active peer, marked DROPPED for a source this
// rank gave up on at dispatch (that source then adds nothing from this rank: its "zeros", without
// writing any). Blocks [num_send_blocks, grid) reduce: the first of them waits (bounded) for every
// other active rank's pushing blocks and publishes the verdict; the others wait for that verdict
// (only when another rank is active); then every reducing block sums its tokens' rows — rows this
// rank's own experts produced are read in place from `y` (never copied), the others from comb_x.
//
// Why an expert rank may overwrite what a source still reads: a source reads comb_x rows pushed
// for this step until its combine ends, and the pushers write the next step's rows only after their
// next dispatch, which needs this source's next dispatch flags (raised after this combine, stream
// order). Rows read in place from `y` are this rank's own; a peer's next dispatch writes only its
// own columns of this rank's receive buffer, which this rank's pushing blocks finished reading
// before they raised their flags — so even `y` aliasing the receive buffer stays safe.
#pragma once
#include "signals_v2.cuh"

extern "C" __global__ void __launch_bounds__(EEP2_THREADS) eep2_combine(const EepParams p, const EepSignals sig) {
  extern __shared__ int s_dyn[];  // pushing blocks: s_rows[S*R], s_start[S*R + 1]
  __shared__ int s_active[EEP_MAX_RANKS];
  __shared__ u64 s_peer[EEP_MAX_RANKS];
  __shared__ int s_warp[32];
  __shared__ int s_use[EEP_MAX_RANKS];

  const int S = (int)p.slots_per_rank, R = (int)p.num_ranks, M = (int)p.max_tokens;
  const int K = (int)p.top_k, T = (int)p.num_tokens, me = (int)p.my_rank, NS = S * R;
  const int num_send = (int)sig.num_send_blocks;
  EepCtrl* ctrl = (EepCtrl*)p.ctrl;
  const u64 seq = *(volatile u64*)&ctrl->dispatch_seq;  // the step of the dispatch this combine answers
  eep2_load_state((const int*)p.active, (const u64*)p.peer_base, R, S, NS, s_active, s_peer, nullptr);
  const EepVec* y = (const EepVec*)p.x;  // [S, R, M, hidden] this rank's expert outputs

  if ((int)blockIdx.x < num_send) {  // ---- push rows home to the other ranks
    int* s_rows = s_dyn;
    int* s_start = s_dyn + NS;
    const int num_rows = eep_sent_rows_table(p, s_active, me, s_rows, s_start, s_warp);
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int item = blockIdx.x * warps + (threadIdx.x >> 5); item < num_rows * EEP_CHUNKS_PER_ROW;
         item += num_send * warps) {
      const int r = item / EEP_CHUNKS_PER_ROW, chunk = item % EEP_CHUNKS_PER_ROW;
      const int pair = eep_pair_of_row(s_start, NS, r), row = r - s_start[pair];
      const int local = pair / R, src = pair - local * R;
      EepVec* to = (EepVec*)(s_peer[src] + p.off_comb_x) + (((u64)me * S + local) * M + row) * EEP_VEC_PER_ROW;
      eep_copy_chunk<EEP_VEC_PER_ROW>(to, y + ((u64)pair * M + row) * EEP_VEC_PER_ROW, chunk, lane);
    }
    eep2_raise(s_peer, me, R, s_active, sig.off_combine_signal, seq, num_send, false, ctrl->dispatch_ok);
    return;
  }

  // ---- reduce: the first reducing block settles which ranks' rows arrived
  const int rb = blockIdx.x - num_send, num_reduce = gridDim.x - num_send;
  eep2_rows_to_add(ctrl, me, R, s_active, s_peer[me], sig.off_combine_signal, seq, rb == 0, s_use);

  const i64* phys = (const i64*)p.phys;
  const int* handle_pos = (const int*)p.handle_pos;
  const float* weights = (const float*)p.weights;
  const EepVec* comb = (const EepVec*)(s_peer[me] + p.off_comb_x);  // [R(expert rank), S, M, hidden]
  EepVec* out = (EepVec*)p.out;
  for (int item = rb * blockDim.x + threadIdx.x; item < T * EEP_VEC_PER_ROW; item += num_reduce * blockDim.x) {
    const int token = item / EEP_VEC_PER_ROW, v = item % EEP_VEC_PER_ROW;
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.f;
    for (int k0 = 0; k0 < K; k0 += 8) {  // eight rows in flight, summed in k order
      const EepVec* from[8];  // the row, null when this choice adds nothing
      bool pushed[8];         // the row came from a peer during this kernel (read past L1)
      float w[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int k = k0 + u, e = token * K + k;
        from[u] = nullptr;
        pushed[u] = false;
        w[u] = 0.f;
        if (k < K) {
          const i64 slot = phys[e];
          const int row = handle_pos[e];
          if (slot >= 0 && slot < NS && row >= 0 && row < M) {
            const int d = (int)slot / S, local = (int)slot - d * S;
            if (s_use[d]) {
              w[u] = weights[e];
              pushed[u] = d != me;
              from[u] = d == me ? y + (((u64)local * R + me) * M + row) * EEP_VEC_PER_ROW
                                : comb + (((u64)d * S + local) * M + row) * EEP_VEC_PER_ROW;
            }
          }
        }
      }
      EepVec val[8];
#pragma unroll
      for (int u = 0; u < 8; ++u)
        if (from[u] != nullptr) val[u] = pushed[u] ? eep2_ld_cg(from[u] + v) : from[u][v];
#pragma unroll
      for (int u = 0; u < 8; ++u)
        if (from[u] != nullptr) eep_accumulate(acc, w[u], val[u]);
    }
    out[item] = eep_pack_bf16x8(acc);
  }
}
