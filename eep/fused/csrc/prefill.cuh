// Prefill ("normal") mode: one copy of a token per destination rank, packed into per-source regions
// of every destination, as eep/reference/prefill.py specifies:
//   recv_x     [num_ranks(src), max_tokens, hidden] bf16   rows of a source in ascending token order
//   src_token  [num_ranks, max_tokens] int32 (-1 past the count)
//   local_slot [num_ranks, max_tokens, top_k] int32 (-1 where the k-th choice lives elsewhere)
//   weight     [num_ranks, max_tokens, top_k] float32 (0 where local_slot is -1)
//   comb_x     [num_ranks(dst), max_tokens, hidden] bf16  partial rows coming home from each destination
// A source writes only its own region of each destination, from the front, so no rank needs another
// source's counts: a late or dead source cannot shift anyone's rows (no offset negotiation round).
//
// Three launches per step, the waits bounded and done by one block each, as in decode mode:
//   eep_prefill_dispatch       bit per (destination, token) in shared memory + per-word prefix
//                              counts give each token's row; warps copy row chunks to peers; the
//                              last block signals, waits, publishes visible counts, hides missing
//                              sources' rows;
//   eep_prefill_combine_send   each destination pushes its partial rows (the caller reduced its
//                              local top-k entries per row) home into the source's comb_x region;
//   eep_prefill_combine_reduce each source sums the partials of the destinations it used, in
//                              ascending rank order, float32, rounded once.
#pragma once
#include "common.cuh"

struct EepPrefillParams {
  u64 x;          // dispatch: [num_tokens, hidden] bf16; combine_send: partial [R, M, hidden] bf16
  u64 phys;       // [num_tokens, top_k] int64 physical slots (NO_EXPERT = -1)
  u64 weights;    // [num_tokens, top_k] float32 top-k weights
  u64 out;        // combine_reduce: [num_tokens, hidden] bf16
  u64 dst_row;    // [max_tokens, R] int32: row of token t in destination d's region for this source
  u64 vis_count;  // [R] int32 rows from each source visible after dispatch
  u64 ctrl;       // EepCtrl* (a prefill buffer has its own)
  u64 peer_base;  // [R] u64
  u64 active;     // [R] int32
  u64 num_tokens, top_k, slots_per_rank, num_ranks, max_tokens, my_rank;
  u64 off_recv_x, off_comb_x, off_src_token, off_local_slot, off_weight, off_raw_count;
  u64 off_dispatch_flag, off_combine_flag;
};

extern "C" __global__ void __launch_bounds__(512) eep_prefill_dispatch(const EepPrefillParams p) {
  extern __shared__ u32 s_dyn32[];  // s_mask[R][words], then s_before[R][words] (set bits in earlier words)
  __shared__ int s_active[EEP_MAX_RANKS];
  __shared__ int s_count[EEP_MAX_RANKS];
  __shared__ int s_ok[EEP_MAX_RANKS];
  __shared__ int s_last;

  const int S = (int)p.slots_per_rank, R = (int)p.num_ranks, M = (int)p.max_tokens;
  const int K = (int)p.top_k, T = (int)p.num_tokens, me = (int)p.my_rank;
  const int num_slots = S * R, words = (M + 31) >> 5;
  u32* s_mask = s_dyn32;
  int* s_before = (int*)(s_dyn32 + R * words);
  EepCtrl* ctrl = (EepCtrl*)p.ctrl;
  const u64* peer = (const u64*)p.peer_base;
  const i64* phys = (const i64*)p.phys;
  const float* weights = (const float*)p.weights;
  const u64 seq = *(volatile u64*)&ctrl->dispatch_seq + 1;

  // 1. which destinations each token goes to, and the row it takes there
  for (int i = threadIdx.x; i < R * words; i += blockDim.x) s_mask[i] = 0u;
  eep_load_active((const int*)p.active, s_active, R);
  __syncthreads();
  for (int e = threadIdx.x; e < T * K; e += blockDim.x) {
    const int slot = eep_valid_slot(phys[e], num_slots, S, s_active);
    const int t = e / K;
    if (slot >= 0) atomicOr(&s_mask[(slot / S) * words + (t >> 5)], 1u << (t & 31));
  }
  __syncthreads();
  for (int d = threadIdx.x; d < R; d += blockDim.x) {  // R is small: one thread per destination
    int run = 0;
    for (int w = 0; w < words; ++w) {
      s_before[d * words + w] = run;
      run += __popc(s_mask[d * words + w]);
    }
    s_count[d] = run;
  }
  __syncthreads();

  // 2. sends: work item = (token, destination, chunk of the row)
  const int lane = threadIdx.x & 31, warps_per_block = blockDim.x >> 5;
  const EepVec* x = (const EepVec*)p.x;
  int* dst_row = (int*)p.dst_row;
  const int num_items = T * R * EEP_CHUNKS_PER_ROW;
  for (int item = blockIdx.x * warps_per_block + (threadIdx.x >> 5); item < num_items;
       item += gridDim.x * warps_per_block) {
    const int chunk = item % EEP_CHUNKS_PER_ROW, pair = item / EEP_CHUNKS_PER_ROW;
    const int t = pair / R, d = pair % R;
    const u32 word = s_mask[d * words + (t >> 5)];
    if (!((word >> (t & 31)) & 1u)) {
      if (chunk == 0 && lane == 0) dst_row[t * R + d] = -1;
      continue;
    }
    const int row = s_before[d * words + (t >> 5)] + __popc(word & ((1u << (t & 31)) - 1u));
    const u64 base = peer[d], region_row = (u64)me * M + row;
    EepVec* to = (EepVec*)(base + p.off_recv_x) + region_row * EEP_VEC_PER_ROW;
    eep_copy_chunk<EEP_VEC_PER_ROW>(to, x + (u64)t * EEP_VEC_PER_ROW, chunk, lane);
    if (chunk == 0) {  // lane k writes the k-th choice's local slot and weight
      for (int k = lane; k < K; k += 32) {
        const int slot = eep_valid_slot(phys[t * K + k], num_slots, S, s_active);
        const bool here = slot >= 0 && slot / S == d;
        ((int*)(base + p.off_local_slot))[region_row * K + k] = here ? slot % S : -1;
        ((float*)(base + p.off_weight))[region_row * K + k] = here ? weights[t * K + k] : 0.f;
      }
    }
    if (chunk == 0 && lane == 0) {
      ((int*)(base + p.off_src_token))[region_row] = t;
      dst_row[t * R + d] = row;
    }
  }
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (M - T) * R; i += gridDim.x * blockDim.x)
    dst_row[T * R + i] = -1;  // rows of the handle past num_tokens
  // counts, and -1 past each count in this source's region of every active destination
  for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < R * M; q += gridDim.x * blockDim.x) {
    const int d = q / M, row = q % M;
    if (!eep_rank_active(s_active, d)) continue;
    const u64 base = peer[d], region_row = (u64)me * M + row;
    if (row == 0) ((int*)(base + p.off_raw_count))[me] = s_count[d];
    if (row >= s_count[d]) {
      ((int*)(base + p.off_src_token))[region_row] = -1;
      for (int k = 0; k < K; ++k) {
        ((int*)(base + p.off_local_slot))[region_row * K + k] = -1;
        ((float*)(base + p.off_weight))[region_row * K + k] = 0.f;
      }
    }
  }

  // 3. last block: signal, bounded wait, publish the counts of the sources that arrived
  if (!eep_arrive_last(&ctrl->dispatch_arrived, &s_last)) return;
  const u64 my_base = peer[me];
  eep_signal_and_wait(ctrl, peer, me, R, s_active, p.off_dispatch_flag, seq, ctrl->dispatch_ok, s_ok);
  __syncthreads();
  __threadfence();
  int* vis_count = (int*)p.vis_count;
  const int* raw_count = (const int*)(my_base + p.off_raw_count);
  for (int src = threadIdx.x; src < R; src += blockDim.x)
    vis_count[src] = s_ok[src] ? min(max(eep_ld_volatile(&raw_count[src]), 0), M) : 0;
  int any_missing = 0;
  for (int src = 0; src < R; ++src) any_missing |= !s_ok[src];
  if (any_missing) {  // inactive or late sources: their regions hold stale rows, hide them
    int* src_token = (int*)(my_base + p.off_src_token);
    int* local_slot = (int*)(my_base + p.off_local_slot);
    for (u64 i = threadIdx.x; i < (u64)R * M; i += blockDim.x) {
      if (s_ok[i / M]) continue;
      src_token[i] = -1;
      for (int k = 0; k < K; ++k) local_slot[i * K + k] = -1;
    }
  }
  if (threadIdx.x == 0) *(volatile u64*)&ctrl->dispatch_seq = seq;
}

extern "C" __global__ void __launch_bounds__(512) eep_prefill_combine_send(const EepPrefillParams p) {
  __shared__ int s_active[EEP_MAX_RANKS];
  __shared__ int s_rows[EEP_MAX_RANKS];
  __shared__ int s_last;

  const int R = (int)p.num_ranks, M = (int)p.max_tokens, me = (int)p.my_rank;
  EepCtrl* ctrl = (EepCtrl*)p.ctrl;
  const u64* peer = (const u64*)p.peer_base;
  const u64 seq = *(volatile u64*)&ctrl->combine_seq + 1;
  eep_load_active((const int*)p.active, s_active, R);
  __syncthreads();
  const int* vis_count = (const int*)p.vis_count;
  for (int r = threadIdx.x; r < R; r += blockDim.x)
    s_rows[r] = eep_rank_active(s_active, r) ? min(max(vis_count[r], 0), M) : 0;
  __syncthreads();

  const int lane = threadIdx.x & 31, warps_per_block = blockDim.x >> 5;
  const EepVec* partial = (const EepVec*)p.x;
  for (int item = blockIdx.x * warps_per_block + (threadIdx.x >> 5); item < R * M * EEP_CHUNKS_PER_ROW;
       item += gridDim.x * warps_per_block) {
    const int chunk = item % EEP_CHUNKS_PER_ROW, q = item / EEP_CHUNKS_PER_ROW;
    const int src = q / M, row = q % M;
    if (row >= s_rows[src]) continue;
    EepVec* to = (EepVec*)(peer[src] + p.off_comb_x) + ((u64)me * M + row) * EEP_VEC_PER_ROW;
    eep_copy_chunk<EEP_VEC_PER_ROW>(to, partial + ((u64)src * M + row) * EEP_VEC_PER_ROW, chunk, lane);
  }

  if (!eep_arrive_last(&ctrl->combine_arrived, &s_last)) return;
  eep_signal_and_wait(ctrl, peer, me, R, s_active, p.off_combine_flag, seq, ctrl->combine_ok, nullptr);
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    *(volatile u64*)&ctrl->combine_seq = seq;
  }
}

extern "C" __global__ void __launch_bounds__(512) eep_prefill_combine_reduce(const EepPrefillParams p) {
  __shared__ int s_use[EEP_MAX_RANKS];  // rank active and its partial rows arrived
  const int R = (int)p.num_ranks, M = (int)p.max_tokens, T = (int)p.num_tokens;
  const EepCtrl* ctrl = (const EepCtrl*)p.ctrl;
  eep_load_arrived(ctrl, (const int*)p.active, s_use, R);
  __syncthreads();
  const int* dst_row = (const int*)p.dst_row;
  const EepVec* comb_x = (const EepVec*)(((const u64*)p.peer_base)[p.my_rank] + p.off_comb_x);
  EepVec* out = (EepVec*)p.out;
  for (int item = blockIdx.x * blockDim.x + threadIdx.x; item < T * EEP_VEC_PER_ROW;
       item += gridDim.x * blockDim.x) {
    const int t = item / EEP_VEC_PER_ROW, v = item % EEP_VEC_PER_ROW;
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.f;
    for (int d = 0; d < R; ++d) {  // ascending destination order, as the reference sums
      const int row = dst_row[t * R + d];
      if (row < 0 || row >= M || !s_use[d]) continue;
      eep_accumulate(acc, 1.f, comb_x[((u64)d * M + row) * EEP_VEC_PER_ROW + v]);
    }
    out[item] = eep_pack_bf16x8(acc);
  }
}
