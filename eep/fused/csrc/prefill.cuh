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

// The combine send: each partial row home to its source's comb_x, zeros for sources dropped at
// dispatch, then the last block's flags and bounded wait. kSpread picks the item order: source-major
// (default: all ranks write into one source at a time) or rows spread over rotated sources (the
// experimental `spread` path, docs/fused.md "Prefill combine: where the time goes").
template <bool kSpread>
__device__ __forceinline__ void eep_prefill_combine_send_impl(const EepPrefillParams& p) {
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
    // spread: consecutive rows go to consecutive sources, and rank `me` starts at source me + 1, so
    // the warps of one wave write into every peer at once, never all into one
    const int src = kSpread ? (q + me + 1) % R : q / M, row = kSpread ? q / R : q % M;
    if (row >= s_rows[src]) continue;
    EepVec* to = (EepVec*)(peer[src] + p.off_comb_x) + ((u64)me * M + row) * EEP_VEC_PER_ROW;
    eep_copy_chunk<EEP_VEC_PER_ROW>(to, partial + ((u64)src * M + row) * EEP_VEC_PER_ROW, chunk, lane);
  }
  eep_zero_dropped_sources(ctrl, peer, s_active, R, p.off_comb_x + (u64)me * M * EEP_VEC_PER_ROW * sizeof(EepVec),
                           (u64)M * EEP_VEC_PER_ROW);

  if (!eep_arrive_last(&ctrl->combine_arrived, &s_last)) return;
  eep_combine_handshake(ctrl, peer, me, R, s_active, p.off_combine_flag, seq);
}

extern "C" __global__ void __launch_bounds__(512) eep_prefill_combine_send(const EepPrefillParams p) {
  eep_prefill_combine_send_impl<false>(p);
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

// ---- experimental combine paths (docs/fused.md "Prefill combine: where the time goes") -------------
// Selected at compile time by EEP_PREFILL_COMBINE (KernelVariant.prefill_combine); the default, 0,
// compiles none of this, so the validated push kernels above are the whole default module.
//   1 "spread": eep_prefill_combine_send's copy with the items ordered row-major over rotated
//     sources, so every moment's writes fan out over all peers instead of all ranks writing into the
//     same source's comb_x at once (the current order is source-major: a rolling ingress hot spot);
//     the reduce is the default eep_prefill_combine_reduce.
//   2 "pull": each destination leaves its partial rows in its own comb_x (indexed by source, the
//     caller's `partial` layout) and raises a ready flag (eep_prefill_combine_ready, one block,
//     bounded wait); then every source reads its tokens' partial rows straight from the peers over
//     NVLink and sums them in registers (eep_prefill_combine_pull): each byte crosses NVLink once
//     and is never written to HBM and read back.
#ifndef EEP_PREFILL_COMBINE
#define EEP_PREFILL_COMBINE 0
#endif

#if EEP_PREFILL_COMBINE == 1
// eep_prefill_combine_send with the spread item order (eep_prefill_combine_send_impl<true>).
extern "C" __global__ void __launch_bounds__(512) eep_prefill_combine_send_spread(const EepPrefillParams p) {
  eep_prefill_combine_send_impl<true>(p);
}
#endif  // EEP_PREFILL_COMBINE == 1

#if EEP_PREFILL_COMBINE == 2
#ifndef EEP_PULL_GROUP
#define EEP_PULL_GROUP 4  // peers whose vectors one thread has in flight at once (R = 4: all of them)
#endif

// A 16-byte load that the compiler would otherwise emit as a generic LD (the address comes from the
// peer table): global space stated, and no L1 line kept (every byte is read once).
__device__ __forceinline__ EepVec eep_ld_stream_v4(const EepVec* ptr) {
  EepVec v;
  asm("ld.global.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.a), "=r"(v.b), "=r"(v.c), "=r"(v.d) : "l"(ptr));
  return v;
}

// One block: this rank's partial rows of step `seq` are complete in its own comb_x (written by
// earlier kernels on this stream); say so to every active peer and wait, bounded, for theirs.
// combine_ok[r] then says whether rank r's rows may be read. The same flags, sequence counter and
// miss accounting as the push path, so the variants can alternate between steps.
extern "C" __global__ void __launch_bounds__(512) eep_prefill_combine_ready(const EepPrefillParams p) {
  __shared__ int s_active[EEP_MAX_RANKS];
  const int R = (int)p.num_ranks, me = (int)p.my_rank;
  EepCtrl* ctrl = (EepCtrl*)p.ctrl;
  const u64* peer = (const u64*)p.peer_base;
  const u64 seq = *(volatile u64*)&ctrl->combine_seq + 1;
  eep_load_active((const int*)p.active, s_active, R);
  __syncthreads();
  if (blockIdx.x != 0) return;  // launched with one block; a larger grid must not signal twice
  eep_combine_handshake(ctrl, peer, me, R, s_active, p.off_combine_flag, seq);
}

// Every source reads, for each of its tokens, the partial row of every destination it went to from
// that destination's comb_x [me, dst_row] (NVLink loads; its own from local memory), sums them in
// ascending rank order in float32 and rounds once: bit-identical to eep_prefill_combine_reduce.
// One thread per 16-byte vector of the output; the loads of up to EEP_PULL_GROUP peers are issued
// before any is used, so a thread keeps that many remote reads in flight.
extern "C" __global__ void __launch_bounds__(512, 2) eep_prefill_combine_pull(const EepPrefillParams p) {
  __shared__ int s_use[EEP_MAX_RANKS];    // rank active and its ready flag arrived
  __shared__ u64 s_from[EEP_MAX_RANKS];   // this source's region of rank r's comb_x
  const int R = (int)p.num_ranks, M = (int)p.max_tokens, T = (int)p.num_tokens, me = (int)p.my_rank;
  const EepCtrl* ctrl = (const EepCtrl*)p.ctrl;
  const u64* peer = (const u64*)p.peer_base;
  eep_load_arrived(ctrl, (const int*)p.active, s_use, R);
  __syncthreads();
  const u64* flags = (const u64*)(peer[me] + p.off_combine_flag);
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    // this block's own acquire of the flag the ready kernel saw, so the rows it guards are visible here
    if (s_use[r]) (void)eep_ld_acquire_sys(flags + r);
    s_from[r] = peer[r] + p.off_comb_x + (u64)me * M * EEP_VEC_PER_ROW * sizeof(EepVec);
  }
  __syncthreads();
  const int* dst_row = (const int*)p.dst_row;
  EepVec* out = (EepVec*)p.out;
  for (int item = blockIdx.x * blockDim.x + threadIdx.x; item < T * EEP_VEC_PER_ROW;
       item += gridDim.x * blockDim.x) {
    const int t = item / EEP_VEC_PER_ROW, v = item % EEP_VEC_PER_ROW;
    const int* rows = dst_row + (u64)t * R;
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.f;
    for (int d0 = 0; d0 < R; d0 += EEP_PULL_GROUP) {
      EepVec val[EEP_PULL_GROUP];
      int row[EEP_PULL_GROUP];
      bool has[EEP_PULL_GROUP];
#pragma unroll
      for (int j = 0; j < EEP_PULL_GROUP; ++j)  // every index first (no branch), then every row load
        row[j] = rows[min(d0 + j, R - 1)];
#pragma unroll
      for (int j = 0; j < EEP_PULL_GROUP; ++j) {
        const int d = min(d0 + j, R - 1);
        has[j] = d0 + j < R && s_use[d] && row[j] >= 0 && row[j] < M;
        val[j] = EepVec{0u, 0u, 0u, 0u};
        if (has[j]) val[j] = eep_ld_stream_v4((const EepVec*)s_from[d] + (u64)row[j] * EEP_VEC_PER_ROW + v);
      }
#pragma unroll
      for (int j = 0; j < EEP_PULL_GROUP; ++j)  // ascending destination order, as the reference sums
        if (has[j]) eep_accumulate(acc, 1.f, val[j]);
    }
    out[item] = eep_pack_bf16x8(acc);
  }
}
#endif  // EEP_PREFILL_COMBINE == 2
