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
// A reducing block takes a group of whole tokens: it places the group's routing entries in shared
// memory once (loaded before the verdict wait), then every thread has all its rows' loads in flight
// at once (eight choices per output vector, every output vector of the thread). Reducing blocks
// beyond the groups (and not the first) exit at once.
//
// Why an expert rank may overwrite what a source still reads: a source reads comb_x rows pushed
// for this step until its combine ends, and the pushers write the next step's rows only after their
// next dispatch, which needs this source's next dispatch flags (raised after this combine, stream
// order). Rows read in place from `y` are this rank's own; a peer's next dispatch writes only its
// own columns of this rank's receive buffer, which this rank's pushing blocks finished reading
// before they raised their flags — so even `y` aliasing the receive buffer stays safe.
#pragma once
#include "signals_v2.cuh"

// A reducing block sums a group of tokens at once: at most as many as fill its threads with one
// output vector each (1 for rows of more than 512 vectors, then several vectors per thread), at
// most 8, and no more than spread the tokens over every reducing block (eep2_group_tokens).
#define EEP2_GROUP_FIT (EEP2_THREADS / EEP_VEC_PER_ROW)
#define EEP2_GROUP_TOKENS (EEP2_GROUP_FIT < 1 ? 1 : (EEP2_GROUP_FIT > 8 ? 8 : EEP2_GROUP_FIT))
#define EEP2_OUT_VECS ((EEP_VEC_PER_ROW + EEP2_THREADS - 1) / EEP2_THREADS)  // output vectors per thread
#define EEP2_GROUP_ENTRIES (EEP2_GROUP_TOKENS * 32)                           // routing entries (top_k <= 32)
#define EEP2_VECS_IN_FLIGHT (EEP2_OUT_VECS < 2 ? EEP2_OUT_VECS : 2)  // output vectors whose rows load together

__device__ __forceinline__ int eep2_group_tokens(int T, int num_reduce) {
  return min(EEP2_GROUP_TOKENS, max(1, (T + num_reduce - 1) / num_reduce));
}

// A routing entry of a group of P tokens (thread e < P * K holds entry e of the group's tokens).
struct Eep2Entry {
  i64 slot;
  int row;
  float w;
};

__device__ __forceinline__ Eep2Entry eep2_load_entry(const EepParams& p, int group, int P, int T, int K) {
  Eep2Entry e = {-1, -1, 0.f};
  const i64 first = (i64)group * P * K, idx = first + threadIdx.x;
  if ((int)threadIdx.x < P * K && idx < (i64)T * K) {
    e.slot = ((const i64*)p.phys)[idx];
    e.row = ((const int*)p.handle_pos)[idx];
    e.w = ((const float*)p.weights)[idx];
  }
  return e;
}

extern "C" __global__ void __launch_bounds__(EEP2_THREADS) eep2_combine(const EepParams p, const EepSignals sig) {
  extern __shared__ int s_dyn[];  // pushing blocks: s_rows[S*R], s_start[S*R + 1]
  __shared__ int s_active[EEP_MAX_RANKS];
  __shared__ u64 s_peer[EEP_MAX_RANKS];
  __shared__ int s_warp[32];
  __shared__ int s_use[EEP_MAX_RANKS];
  __shared__ const EepVec* s_from[EEP2_GROUP_ENTRIES];  // a group's rows, null when the choice adds nothing
  __shared__ int s_pushed[EEP2_GROUP_ENTRIES];          // the row came from a peer during this kernel
  __shared__ float s_w[EEP2_GROUP_ENTRIES];

  eep2_launch_dependents();  // the next dispatch's launch may overlap this grid's tail (PDL only)
  const int S = (int)p.slots_per_rank, R = (int)p.num_ranks, M = (int)p.max_tokens;
  const int K = (int)p.top_k, T = (int)p.num_tokens, me = (int)p.my_rank, NS = S * R;
  const int num_send = (int)sig.num_send_blocks;
  const bool pushing = (int)blockIdx.x < num_send;
  const int rb = blockIdx.x - num_send, num_reduce = gridDim.x - num_send;
  const int P = eep2_group_tokens(T, num_reduce), num_groups = (T + P - 1) / P;
  if (!pushing && rb != 0 && rb >= num_groups) return;  // no tokens here (the first reducing block settles the verdict)
  EepCtrl* ctrl = (EepCtrl*)p.ctrl;
  eep2_grid_wait();  // PDL: the dispatch's results (dispatch_seq, handle_pos, y) are visible from here on
  // issued before anything waits: the mask and peer table (first: everything below waits for them),
  // the control block and (reducing) the first group's routing entries
  const Eep2Launch launch = eep2_issue_state((const int*)p.active, (const u64*)p.peer_base, R);
  const Eep2Ctrl c = eep2_read_ctrl(ctrl, R);
  Eep2Entry entry = {-1, -1, 0.f};
  if (!pushing) entry = eep2_load_entry(p, rb, P, T, K);
  const bool any_remote = eep2_store_state(launch, me, R, S, NS, s_active, s_peer, nullptr);
  const u64 seq = c.dispatch_seq;  // the step of the dispatch this combine answers
  const EepVec* y = (const EepVec*)p.x;  // [S, R, M, hidden] this rank's expert outputs

  if (pushing) {  // ---- push rows home to the other ranks
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
    eep2_raise(s_peer, me, R, s_active, sig.off_combine_signal, seq, num_send, c.dispatch_ok == 0);
    return;
  }

  // ---- reduce: the first reducing block settles which ranks' rows arrived
  eep2_rows_to_add(ctrl, c, me, R, s_active, any_remote, s_peer[me], sig.off_combine_signal, seq, rb == 0, s_use);

  const EepVec* comb = (const EepVec*)(s_peer[me] + p.off_comb_x);  // [R(expert rank), S, M, hidden]
  EepVec* out = (EepVec*)p.out;
  for (int g = rb; g < num_groups; g += num_reduce) {
    if (g != rb) entry = eep2_load_entry(p, g, P, T, K);
    if ((int)threadIdx.x < P * K) {  // where the group's choices' rows are, once per block
      const EepVec* from = nullptr;
      bool pushed = false;
      if (entry.slot >= 0 && entry.slot < NS && entry.row >= 0 && entry.row < M) {
        const int d = (int)entry.slot / S, local = (int)entry.slot - d * S;
        if (s_use[d]) {
          pushed = d != me;
          from = d == me ? y + (((u64)local * R + me) * M + entry.row) * EEP_VEC_PER_ROW
                         : comb + (((u64)d * S + local) * M + entry.row) * EEP_VEC_PER_ROW;
        }
      }
      s_from[threadIdx.x] = from;
      s_pushed[threadIdx.x] = pushed;
      s_w[threadIdx.x] = entry.w;
    }
    __syncthreads();
    // thread: output vectors it + j * 512 of the group (it = token in the group * vectors per row +
    // vector), two at a time; several vectors per thread only with one token per group, so all of
    // them belong to the same token: one set of eight rows per step of k
    const int tok = (int)threadIdx.x / EEP_VEC_PER_ROW;
    const bool token_live = tok < P && g * P + tok < T;
#pragma unroll
    for (int j0 = 0; j0 < EEP2_OUT_VECS; j0 += EEP2_VECS_IN_FLIGHT) {
      float acc[EEP2_VECS_IN_FLIGHT][8];
      int vec[EEP2_VECS_IN_FLIGHT];
      bool live[EEP2_VECS_IN_FLIGHT];
#pragma unroll
      for (int j = 0; j < EEP2_VECS_IN_FLIGHT; ++j) {
        vec[j] = (int)threadIdx.x + (j0 + j) * EEP2_THREADS - tok * EEP_VEC_PER_ROW;
        live[j] = token_live && j0 + j < EEP2_OUT_VECS && vec[j] < EEP_VEC_PER_ROW;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[j][i] = 0.f;
      }
      for (int k0 = 0; k0 < K; k0 += 8) {  // eight choices' rows in flight per vector, summed in k order
        const int e0 = tok * K + k0;
        const EepVec* from[8];
        u32 pushed = 0;  // bit u: choice k0 + u's row came from a peer
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int e = min(e0 + u, EEP2_GROUP_ENTRIES - 1);
          from[u] = token_live && k0 + u < K ? s_from[e] : nullptr;
          pushed |= (u32)(s_pushed[e] != 0) << u;
        }
        EepVec val[EEP2_VECS_IN_FLIGHT][8];
#pragma unroll
        for (int j = 0; j < EEP2_VECS_IN_FLIGHT; ++j)
#pragma unroll
          for (int u = 0; u < 8; ++u)
            if (live[j] && from[u] != nullptr)
              val[j][u] = (pushed >> u) & 1u ? eep2_ld_cg(from[u] + vec[j]) : from[u][vec[j]];
#pragma unroll
        for (int j = 0; j < EEP2_VECS_IN_FLIGHT; ++j)
#pragma unroll
          for (int u = 0; u < 8; ++u)
            if (live[j] && from[u] != nullptr) eep_accumulate(acc[j], s_w[e0 + u], val[j][u]);
      }
#pragma unroll
      for (int j = 0; j < EEP2_VECS_IN_FLIGHT; ++j)
        if (live[j]) out[((u64)g * P + tok) * EEP_VEC_PER_ROW + vec[j]] = eep_pack_bf16x8(acc[j]);
    }
    __syncthreads();  // the next group's entries overwrite s_from
  }
}
