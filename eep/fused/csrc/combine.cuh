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
  const int num_rows = eep_sent_rows_table(p, s_active, -1, s_rows, s_start, s_warp);

  const int lane = threadIdx.x & 31, warps_per_block = blockDim.x >> 5;
  const EepVec* y = (const EepVec*)p.x;
  for (int item = blockIdx.x * warps_per_block + (threadIdx.x >> 5); item < num_rows * EEP_CHUNKS_PER_ROW;
       item += gridDim.x * warps_per_block) {
    const int r = item / EEP_CHUNKS_PER_ROW, chunk = item % EEP_CHUNKS_PER_ROW;
    const int pair = eep_pair_of_row(s_start, num_pairs, r), row = r - s_start[pair];
    const int local = pair / R, src = pair % R;
    const EepVec* from = y + ((u64)pair * M + row) * EEP_VEC_PER_ROW;
    EepVec* to = (EepVec*)(peer[src] + p.off_comb_x) + (((u64)me * S + local) * M + row) * EEP_VEC_PER_ROW;
    eep_copy_chunk<EEP_VEC_PER_ROW>(to, from, chunk, lane);
  }
  eep_zero_dropped_sources(ctrl, peer, s_active, R, p.off_comb_x + (u64)me * S * M * EEP_VEC_PER_ROW * sizeof(EepVec),
                           (u64)S * M * EEP_VEC_PER_ROW);

  if (!eep_arrive_last(&ctrl->combine_arrived, &s_last)) return;
  eep_combine_handshake(ctrl, peer, me, R, s_active, p.off_combine_flag, seq);
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

// ---- experimental decode path "pull" (KernelVariant.decode; docs/fused.md "Decode: where the time goes")
// Compiled only with -DEEP_DECODE_PULL=1, so the default module keeps exactly the kernels above.
// The expert rank leaves its outputs in its own buffer (comb_x region read as [S, R, M, hidden],
// written by the experts through FusedBuffer.combine_input() or copied there by eep_combine_stage),
// raises one "ready" flag per step on every active peer (eep_combine_ready, one block, bounded
// wait for every peer's flag), and every source pulls its top-k rows over NVLink and sums them
// in k order as it reads them (eep_combine_pull): no push pass, no comb_x write + re-read, and the
// only handshake is one flag per (step, peer) before any data moves.
// Why the expert rank may overwrite the region next step: it writes it only after its next
// dispatch returned, which needs every active source's next dispatch flag, raised after that
// source's pull of this step finished (stream order on the source).
#ifndef EEP_DECODE_PULL
#define EEP_DECODE_PULL 0
#endif
#if EEP_DECODE_PULL

// A 16-byte load of peer memory that never allocates in this SM's L1, so a line read in an
// earlier step can never be served stale.
__device__ __forceinline__ EepVec eep_ld_peer_vec(const EepVec* p) {
  EepVec v;
  asm("ld.global.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.a), "=r"(v.b), "=r"(v.c), "=r"(v.d) : "l"(p));
  return v;
}

// Copy the rows a combine will read (row < count of each active (slot, source) block) of y
// [S, R, M, hidden] into this rank's combine input region (same layout). Local memory only.
extern "C" __global__ void __launch_bounds__(512) eep_combine_stage(const EepParams p) {
  extern __shared__ int s_dyn[];  // s_rows[S*R], s_start[S*R + 1]
  __shared__ int s_active[EEP_MAX_RANKS];
  __shared__ int s_warp[32];

  const int S = (int)p.slots_per_rank, R = (int)p.num_ranks, M = (int)p.max_tokens;
  const int num_pairs = S * R;
  int* s_rows = s_dyn;
  int* s_start = s_dyn + num_pairs;
  eep_load_active((const int*)p.active, s_active, R);
  __syncthreads();
  const int num_rows = eep_sent_rows_table(p, s_active, -1, s_rows, s_start, s_warp);

  const int lane = threadIdx.x & 31, warps_per_block = blockDim.x >> 5;
  const EepVec* y = (const EepVec*)p.x;
  EepVec* region = (EepVec*)(((const u64*)p.peer_base)[p.my_rank] + p.off_comb_x);
  for (int item = blockIdx.x * warps_per_block + (threadIdx.x >> 5); item < num_rows * EEP_CHUNKS_PER_ROW;
       item += gridDim.x * warps_per_block) {
    const int r = item / EEP_CHUNKS_PER_ROW, chunk = item % EEP_CHUNKS_PER_ROW;
    const int pair = eep_pair_of_row(s_start, num_pairs, r);
    const u64 at = ((u64)pair * M + (r - s_start[pair])) * EEP_VEC_PER_ROW;
    eep_copy_chunk<EEP_VEC_PER_ROW>(region + at, y + at, chunk, lane);
  }
}

// One block: this rank's combine input is in place (every earlier kernel on the stream wrote
// it), so raise flag `seq` on every active peer, wait a bounded time for every active peer's,
// record combine_ok, advance combine_seq.
extern "C" __global__ void __launch_bounds__(512) eep_combine_ready(const EepParams p) {
  __shared__ int s_active[EEP_MAX_RANKS];
  const int R = (int)p.num_ranks, S = (int)p.slots_per_rank, M = (int)p.max_tokens;
  EepCtrl* ctrl = (EepCtrl*)p.ctrl;
  const u64 seq = *(volatile u64*)&ctrl->combine_seq + 1;
  eep_load_active((const int*)p.active, s_active, R);
  __syncthreads();
  // A source this rank gave up on at dispatch still pulls its rows from here (it cannot know): zeros,
  // which add exactly nothing to its sum, instead of an earlier step's rows. Only after a missed deadline.
  EepVec* region = (EepVec*)(((const u64*)p.peer_base)[p.my_rank] + p.off_comb_x);  // [S, R, M] rows
  const EepVec zero = {0u, 0u, 0u, 0u};
  for (int src = 0; src < R; ++src) {
    if (!eep_rank_active(s_active, src) || ctrl->dispatch_ok[src]) continue;
    for (int local = 0; local < S; ++local) {
      EepVec* rows = region + ((u64)local * R + src) * M * EEP_VEC_PER_ROW;
      for (u64 v = threadIdx.x; v < (u64)M * EEP_VEC_PER_ROW; v += blockDim.x) rows[v] = zero;
    }
  }
  __syncthreads();
  eep_combine_handshake(ctrl, (const u64*)p.peer_base, (int)p.my_rank, R, s_active, p.off_combine_flag, seq);
}

// The reduce of eep_combine_reduce (same float32 mul-then-add in k order, so bit-identical to
// eep.reference.combine), reading each contribution straight from the expert rank's combine
// input region: row handle_pos of block (slot % S, this rank) in rank slot / S's buffer.
// All top-k loads of one 16-byte column are issued before any is used (8 in flight per thread).
extern "C" __global__ void __launch_bounds__(512) eep_combine_pull(const EepParams p) {
  __shared__ int s_use[EEP_MAX_RANKS];  // rank active and its ready flag arrived
  __shared__ u64 s_peer[EEP_MAX_RANKS];
  const int S = (int)p.slots_per_rank, R = (int)p.num_ranks, M = (int)p.max_tokens;
  const int K = (int)p.top_k, T = (int)p.num_tokens, num_slots = S * R, me = (int)p.my_rank;
  const u64* peer = (const u64*)p.peer_base;
  eep_load_arrived((const EepCtrl*)p.ctrl, (const int*)p.active, s_use, R);
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    s_peer[r] = peer[r] + p.off_comb_x;
    // re-acquire the ready flag eep_combine_ready saw (its value is not needed: combine_ok decided),
    // so this block's reads of rank r's region are ordered after r's release in this kernel too
    if (s_use[r]) (void)eep_ld_acquire_sys((const u64*)(peer[me] + p.off_combine_flag) + r);
  }
  __syncthreads();
  const i64* phys = (const i64*)p.phys;
  const int* handle_pos = (const int*)p.handle_pos;
  const float* weights = (const float*)p.weights;
  EepVec* out = (EepVec*)p.out;
  for (int item = blockIdx.x * blockDim.x + threadIdx.x; item < T * EEP_VEC_PER_ROW;
       item += gridDim.x * blockDim.x) {
    const int token = item / EEP_VEC_PER_ROW, v = item % EEP_VEC_PER_ROW;
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.f;
    for (int k0 = 0; k0 < K; k0 += 8) {
      i64 slot[8];
      int row[8];
      float w[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {  // the small per-copy loads first, all independent
        const int k = k0 + u, e = token * K + k;
        slot[u] = k < K ? phys[e] : -1;
        row[u] = k < K ? handle_pos[e] : -1;
        w[u] = k < K ? weights[e] : 0.f;
      }
      EepVec val[8];
      bool use[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {  // then every row load, before the first add
        use[u] = slot[u] >= 0 && slot[u] < num_slots && row[u] >= 0 && row[u] < M && s_use[(int)slot[u] / S];
        if (use[u]) {
          const EepVec* region = (const EepVec*)s_peer[(int)slot[u] / S];
          val[u] = eep_ld_peer_vec(region + (((u64)((int)slot[u] % S) * R + me) * M + row[u]) * EEP_VEC_PER_ROW + v);
        }
      }
#pragma unroll
      for (int u = 0; u < 8; ++u)
        if (use[u]) eep_accumulate(acc, w[u], val[u]);
    }
    out[item] = eep_pack_bf16x8(acc);
  }
}

#endif  // EEP_DECODE_PULL
