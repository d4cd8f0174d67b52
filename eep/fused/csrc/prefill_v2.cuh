// Kernel set v2, prefill ("normal") mode: the per-source regions of eep/reference/prefill.py exactly
// (one copy of a token per destination rank, rows in ascending token order, src_token / local_slot
// -1 and weight 0 past each count), one launch per direction, the signalling of signals_v2.cuh.
//
// eep2_prefill_dispatch: block b of G owns a contiguous range of tokens. It counts, per destination
//   rank, the tokens before its range (warp ballots over the routing table), assigns its tokens'
//   rows in token order, then moves 4 KiB chunks of each token's row: loaded once, stored once per
//   destination rank the token has a choice on (so a row is read from HBM once, not once per rank);
//   each warp's first chunk is loaded before the count, which then hides its latency.
//   The last block alone knows the totals: it writes the counts and the tails, then waits (bounded)
//   for every source's flags and publishes what arrived.
// eep2_prefill_combine: blocks [0, num_send_blocks) push partial rows home to the other ranks, rows
//   spread over the sources so that each moment's stores fan out over every peer; the other blocks
//   reduce — a token's partials in ascending rank order, float32, rounded once (bit-identical to
//   eep_prefill_combine_reduce) — reading this rank's own partials in place from `partial` and the
//   pushed ones from comb_x once the first reducing block has settled which ranks arrived.
#pragma once
#include "signals_v2.cuh"

#define EEP2_CHUNK_VECS_PER_LANE 8                                // 128 B per lane in flight
#define EEP2_CHUNK_VECS (32 * EEP2_CHUNK_VECS_PER_LANE)           // one warp moves 4 KiB of bf16
#define EEP2_CHUNKS_PER_ROW ((EEP_VEC_PER_ROW + EEP2_CHUNK_VECS - 1) / EEP2_CHUNK_VECS)
#define EEP2_REDUCE_UNROLL 4                                      // output vectors a reducing thread has in flight
#define EEP2_SCAN_UNROLL 4                                        // tokens a thread reads at once when counting

// One lane's vectors of chunk `chunk` of token t's row (lanes interleaved), every load issued at once.
__device__ __forceinline__ void eep2_load_chunk(const EepVec* x, int t, int chunk, EepVec* v) {
  const EepVec* from = x + (u64)t * EEP_VEC_PER_ROW;
  const int first = chunk * EEP2_CHUNK_VECS + (threadIdx.x & 31);
#pragma unroll
  for (int j = 0; j < EEP2_CHUNK_VECS_PER_LANE; ++j)
    if (first + j * 32 < EEP_VEC_PER_ROW) v[j] = from[first + j * 32];
}

__device__ __forceinline__ u64 eep2_warp_or(u64 bits) {
  const u32 lo = __reduce_or_sync(0xffffffffu, (u32)bits), hi = __reduce_or_sync(0xffffffffu, (u32)(bits >> 32));
  return ((u64)hi << 32) | lo;
}

// The whole warp: s_next[d] += the number of lanes whose `ranks` has bit d, for every d.
__device__ __forceinline__ void eep2_warp_count_ranks(u64 ranks, int* s_next) {
  for (u64 any = eep2_warp_or(ranks); any; any &= any - 1) {
    const int d = __ffsll((long long)any) - 1;
    const u32 voters = __ballot_sync(0xffffffffu, (ranks >> d) & 1ull);
    if ((threadIdx.x & 31) == 0) atomicAdd(&s_next[d], __popc(voters));
  }
}

extern "C" __global__ void __launch_bounds__(EEP2_THREADS) eep2_prefill_dispatch(const EepPrefillParams p,
                                                                                 const EepSignals sig) {
  // s_ranks[tpb] u64 | s_row[tpb * R] | s_slot[tpb * K] | s_slot_dst[NS]  (layout: prefill_v2_smem_bytes)
  extern __shared__ u64 s_dyn64[];
  __shared__ int s_active[EEP_MAX_RANKS];
  __shared__ u64 s_peer[EEP_MAX_RANKS];
  __shared__ int s_next[EEP_MAX_RANKS];  // per destination: rows taken so far (tokens before, then own)
  __shared__ int s_ok[EEP_MAX_RANKS];

  const int S = (int)p.slots_per_rank, R = (int)p.num_ranks, M = (int)p.max_tokens;
  const int K = (int)p.top_k, T = (int)p.num_tokens, me = (int)p.my_rank, NS = S * R;
  const int G = gridDim.x, b = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  EepCtrl* ctrl = (EepCtrl*)p.ctrl;
  const i64* phys = (const i64*)p.phys;
  int* dst_row = (int*)p.dst_row;
  // the mask and peer table first: the count waits for them, and a load issued after the first
  // chunk's would arrive after it
  const Eep2Launch launch = eep2_issue_state((const int*)p.active, (const u64*)p.peer_base, R);
  const Eep2Ctrl c = eep2_read_ctrl(ctrl, R);
  const u64 seq = c.dispatch_seq + 1;
  const int t0 = (int)((i64)b * T / G), t1 = (int)((i64)(b + 1) * T / G), ntok = t1 - t0;
  const int tpb = (M + G - 1) / G;
  u64* s_ranks = s_dyn64;
  int* s_row = (int*)(s_ranks + tpb);
  int* s_slot = s_row + tpb * R;
  int* s_slot_dst = s_slot + tpb * K;

  // the row chunk of this warp's first item, loaded now: its latency hides behind the count below
  const EepVec* x = (const EepVec*)p.x;
  EepVec first_chunk[EEP2_CHUNK_VECS_PER_LANE];
  if (warp < ntok * EEP2_CHUNKS_PER_ROW) eep2_load_chunk(x, t0 + warp / EEP2_CHUNKS_PER_ROW, warp % EEP2_CHUNKS_PER_ROW, first_chunk);
  for (int r = threadIdx.x; r < R; r += blockDim.x) s_next[r] = 0;
  eep2_raise_own(launch, me, sig.off_dispatch_signal, seq, G);  // "read the step": nothing to order
  const bool any_remote = eep2_store_state(launch, me, R, S, NS, s_active, s_peer, s_slot_dst);

  // 1. per destination, the tokens before this block's range (a warp reads 4 x 32 tokens' choices at
  //    once: the last block reads almost the whole table); this block's tokens' ranks and slots
  for (int base = warp * 32 * EEP2_SCAN_UNROLL; base < t0; base += blockDim.x * EEP2_SCAN_UNROLL) {
    u64 ranks[EEP2_SCAN_UNROLL];
#pragma unroll
    for (int j = 0; j < EEP2_SCAN_UNROLL; ++j) ranks[j] = 0;
    for (int k0 = 0; k0 < K; k0 += 8) {
      i64 slot[EEP2_SCAN_UNROLL][8];
#pragma unroll
      for (int j = 0; j < EEP2_SCAN_UNROLL; ++j) {
        const int t = base + j * 32 + lane;
        if (t < t0) eep2_load_choices(phys, t, K, k0, slot[j]);
        else
#pragma unroll
          for (int u = 0; u < 8; ++u) slot[j][u] = -1;
      }
#pragma unroll
      for (int j = 0; j < EEP2_SCAN_UNROLL; ++j)
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int d = eep2_entry_rank(slot[j][u], NS, s_slot_dst);
          if (d >= 0) ranks[j] |= 1ull << d;
        }
    }
#pragma unroll
    for (int j = 0; j < EEP2_SCAN_UNROLL; ++j) eep2_warp_count_ranks(ranks[j], s_next);
  }
  for (int i = threadIdx.x; i < ntok; i += blockDim.x) {
    u64 ranks = 0;
    for (int k0 = 0; k0 < K; k0 += 8) {
      i64 slot[8];
      eep2_load_choices(phys, t0 + i, K, k0, slot);
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        if (k0 + u >= K) break;
        const int d = eep2_entry_rank(slot[u], NS, s_slot_dst);
        s_slot[i * K + k0 + u] = d >= 0 ? (int)slot[u] : -1;
        if (d >= 0) ranks |= 1ull << d;
      }
    }
    s_ranks[i] = ranks;
  }
  __syncthreads();

  // 2. rows of this block's tokens, in token order (warp 0, 32 tokens at a time)
  if (warp == 0) {
    for (int c = 0; c < ntok; c += 32) {
      const int i = c + lane;
      const u64 ranks = i < ntok ? s_ranks[i] : 0ull;
      for (u64 any = eep2_warp_or(ranks); any; any &= any - 1) {
        const int d = __ffsll((long long)any) - 1;
        const u32 voters = __ballot_sync(0xffffffffu, (ranks >> d) & 1ull);
        const int first = s_next[d];
        if ((ranks >> d) & 1ull) s_row[i * R + d] = first + __popc(voters & ((1u << lane) - 1u));
        __syncwarp();
        if (lane == 0) s_next[d] = first + __popc(voters);
        __syncwarp();
      }
    }
  }
  __syncthreads();
  for (int q = threadIdx.x; q < ntok * R; q += blockDim.x) {  // the handle: -1 where not sent
    const int i = q / R, d = q - i * R;
    dst_row[(i64)(t0 + i) * R + d] = ((s_ranks[i] >> d) & 1ull) ? s_row[i * R + d] : -1;
  }

  // 3. rows: work item = (token, 4 KiB chunk), loaded once, stored to every destination rank of the token
  const float* weights = (const float*)p.weights;
  for (int item = warp; item < ntok * EEP2_CHUNKS_PER_ROW; item += warps) {
    const int i = item / EEP2_CHUNKS_PER_ROW, chunk = item - i * EEP2_CHUNKS_PER_ROW;
    const u64 ranks = s_ranks[i];
    if (ranks == 0) continue;
    const int t = t0 + i, first = chunk * EEP2_CHUNK_VECS + lane;
    EepVec v[EEP2_CHUNK_VECS_PER_LANE];
    if (item == warp) {
#pragma unroll
      for (int j = 0; j < EEP2_CHUNK_VECS_PER_LANE; ++j) v[j] = first_chunk[j];
    } else {
      eep2_load_chunk(x, t, chunk, v);
    }
    for (u64 left = ranks; left; left &= left - 1) {
      const int d = __ffsll((long long)left) - 1;
      const u64 region_row = (u64)me * M + s_row[i * R + d];
      EepVec* to = (EepVec*)(s_peer[d] + p.off_recv_x) + region_row * EEP_VEC_PER_ROW;
#pragma unroll
      for (int j = 0; j < EEP2_CHUNK_VECS_PER_LANE; ++j)
        if (first + j * 32 < EEP_VEC_PER_ROW) to[first + j * 32] = v[j];
      if (chunk == 0) {  // the row's metadata: lane k writes the k-th choice's local slot and weight here
        for (int k = lane; k < K; k += 32) {
          const int slot = s_slot[i * K + k];
          const bool here = slot >= 0 && s_slot_dst[slot] == d;
          ((int*)(s_peer[d] + p.off_local_slot))[region_row * K + k] = here ? slot - d * S : -1;
          ((float*)(s_peer[d] + p.off_weight))[region_row * K + k] = here ? weights[(i64)t * K + k] : 0.f;
        }
        if (lane == 0) ((int*)(s_peer[d] + p.off_src_token))[region_row] = t;
      }
    }
  }

  // 4. the last block knows the totals: counts, then -1 / 0 past them in every active destination
  const bool last = b == G - 1;
  if (last) {
    for (int d = 0; d < R; ++d) {
      if (!eep_rank_active(s_active, d)) continue;
      const int count = min(s_next[d], M);
      const u64 region = (u64)me * M;
      if (threadIdx.x == 0) ((int*)(s_peer[d] + p.off_raw_count))[me] = count;
      int* src_token = (int*)(s_peer[d] + p.off_src_token) + region;
      int* local_slot = (int*)(s_peer[d] + p.off_local_slot) + region * K;
      float* weight = (float*)(s_peer[d] + p.off_weight) + region * K;
      for (int row = count + threadIdx.x; row < M; row += blockDim.x) src_token[row] = -1;
      for (int e = count * K + threadIdx.x; e < M * K; e += blockDim.x) {
        local_slot[e] = -1;
        weight[e] = 0.f;
      }
    }
    for (int e = T * R + threadIdx.x; e < M * R; e += blockDim.x) dst_row[e] = -1;  // handle rows past T
  }
  if (any_remote) eep2_raise(s_peer, me, R, s_active, sig.off_dispatch_signal, seq, G, false);
  if (!last) return;

  // 5. the last block: wait for every source, publish what arrived, hide what did not
  eep2_dispatch_arrivals(ctrl, c, me, R, s_active, s_peer[me], sig.off_dispatch_signal, seq, s_ok);
  // this rank's own count is the one this block wrote above (s_next[me]); only other sources' counts
  // are read back
  const int* raw_count = (const int*)(s_peer[me] + p.off_raw_count);
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    const int count = !s_ok[r] ? 0 : r == me ? s_next[me] : eep_ld_volatile(&raw_count[r]);
    ((int*)p.vis_count)[r] = s_ok[r] ? min(max(count, 0), M) : 0;
  }
  for (int src = 0; src < R; ++src) {  // inactive or late sources: their regions hold stale rows
    if (s_ok[src]) continue;
    int* src_token = (int*)(s_peer[me] + p.off_src_token) + (u64)src * M;
    int* local_slot = (int*)(s_peer[me] + p.off_local_slot) + (u64)src * M * K;
    for (int row = threadIdx.x; row < M; row += blockDim.x) src_token[row] = -1;
    for (int e = threadIdx.x; e < M * K; e += blockDim.x) local_slot[e] = -1;
  }
  __syncthreads();
  if (threadIdx.x == 0) *(volatile u64*)&ctrl->dispatch_seq = seq;
}

extern "C" __global__ void __launch_bounds__(EEP2_THREADS) eep2_prefill_combine(const EepPrefillParams p,
                                                                                const EepSignals sig) {
  __shared__ int s_active[EEP_MAX_RANKS];
  __shared__ u64 s_peer[EEP_MAX_RANKS];
  __shared__ int s_rows[EEP_MAX_RANKS];
  __shared__ int s_use[EEP_MAX_RANKS];

  const int R = (int)p.num_ranks, M = (int)p.max_tokens, T = (int)p.num_tokens, me = (int)p.my_rank;
  const int num_send = (int)sig.num_send_blocks;
  EepCtrl* ctrl = (EepCtrl*)p.ctrl;
  const Eep2Launch launch = eep2_issue_state((const int*)p.active, (const u64*)p.peer_base, R);  // first
  const Eep2Ctrl c = eep2_read_ctrl(ctrl, R);
  const bool any_remote = eep2_store_state(launch, me, R, 1, 0, s_active, s_peer, nullptr);
  const u64 seq = c.dispatch_seq;  // the step of the dispatch this combine answers
  const EepVec* partial = (const EepVec*)p.x;  // [R(src), M, hidden] this rank's partial rows per source

  if ((int)blockIdx.x < num_send) {  // ---- push partial rows home to the other ranks
    const int* vis_count = (const int*)p.vis_count;
    for (int r = threadIdx.x; r < R; r += blockDim.x)
      s_rows[r] = r != me && eep_rank_active(s_active, r) ? min(max(vis_count[r], 0), M) : 0;
    __syncthreads();
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int item = blockIdx.x * warps + (threadIdx.x >> 5); item < R * M * EEP_CHUNKS_PER_ROW;
         item += num_send * warps) {
      const int q = item / EEP_CHUNKS_PER_ROW, chunk = item - q * EEP_CHUNKS_PER_ROW;
      // consecutive items go to consecutive sources, rank `me` starting at me + 1: every peer at once
      const int row = q / R, src = (q - row * R + me + 1) % R;
      if (row >= s_rows[src]) continue;
      EepVec* to = (EepVec*)(s_peer[src] + p.off_comb_x) + ((u64)me * M + row) * EEP_VEC_PER_ROW;
      eep_copy_chunk<EEP_VEC_PER_ROW>(to, partial + ((u64)src * M + row) * EEP_VEC_PER_ROW, chunk, lane);
    }
    eep2_raise(s_peer, me, R, s_active, sig.off_combine_signal, seq, num_send, c.dispatch_ok == 0);
    return;
  }

  // ---- reduce: the first reducing block settles which ranks' rows arrived
  const int rb = blockIdx.x - num_send, num_reduce = gridDim.x - num_send;
  eep2_rows_to_add(ctrl, c, me, R, s_active, any_remote, s_peer[me], sig.off_combine_signal, seq, rb == 0, s_use);

  const int* dst_row = (const int*)p.dst_row;
  const EepVec* comb = (const EepVec*)(s_peer[me] + p.off_comb_x);  // [R(dst), M, hidden]
  EepVec* out = (EepVec*)p.out;
  const int total = T * EEP_VEC_PER_ROW, stride = num_reduce * blockDim.x;
  for (int base = rb * blockDim.x + threadIdx.x; base < total; base += EEP2_REDUCE_UNROLL * stride) {
    float acc[EEP2_REDUCE_UNROLL][8];
    int token[EEP2_REDUCE_UNROLL], vec[EEP2_REDUCE_UNROLL];
#pragma unroll
    for (int u = 0; u < EEP2_REDUCE_UNROLL; ++u) {
      const int item = base + u * stride;
      token[u] = item < total ? item / EEP_VEC_PER_ROW : -1;
      vec[u] = item - (item / EEP_VEC_PER_ROW) * EEP_VEC_PER_ROW;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[u][i] = 0.f;
    }
    for (int d = 0; d < R; ++d) {  // ascending destination order, as the reference sums
      if (!s_use[d]) continue;
      int row[EEP2_REDUCE_UNROLL];
      EepVec val[EEP2_REDUCE_UNROLL];
#pragma unroll
      for (int u = 0; u < EEP2_REDUCE_UNROLL; ++u) {
        row[u] = token[u] >= 0 ? dst_row[(i64)token[u] * R + d] : -1;
        if (row[u] >= M) row[u] = -1;
      }
#pragma unroll
      for (int u = 0; u < EEP2_REDUCE_UNROLL; ++u) {
        if (row[u] < 0) continue;
        val[u] = d == me ? partial[((u64)me * M + row[u]) * EEP_VEC_PER_ROW + vec[u]]
                         : eep2_ld_cg(comb + ((u64)d * M + row[u]) * EEP_VEC_PER_ROW + vec[u]);
      }
#pragma unroll
      for (int u = 0; u < EEP2_REDUCE_UNROLL; ++u)
        if (row[u] >= 0) eep_accumulate(acc[u], 1.f, val[u]);
    }
#pragma unroll
    for (int u = 0; u < EEP2_REDUCE_UNROLL; ++u)
      if (token[u] >= 0) out[base + u * stride] = eep_pack_bf16x8(acc[u]);
  }
}
