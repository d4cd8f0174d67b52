// Low-latency dispatch: every (token, k) copy goes straight into its destination rank's receive
// buffer, laid out [slots_per_rank, num_ranks, max_tokens, hidden] as eep/reference/dispatch.py
// specifies (rows of a (slot, source) block in ascending source-token order).
//
// One launch per step, grid of any size:
//   1. every block builds the same layout in shared memory: bit t of mask[slot] is set when token
//      t goes to that slot, so a copy's row is the number of set bits below t and a block's count
//      is the number of set bits (no global pre-pass, no atomics across blocks);
//   2. warps copy 2 KiB chunks of rows to peers (NVLink stores) and write src_token, raw counts;
//   3. the last block to finish raises this rank's flag on every active peer (release, system
//      scope), waits a bounded time for every active peer's flag, and publishes the counts of the
//      sources that arrived (0 for the rest; their src_token columns are set to -1).
// Senders also write src_token = -1 past each count, so the receiver's serial tail stays short.
// Membership, peer table, step sequence number and timeout are read from device memory at
// launch, so a captured CUDA graph stays valid across membership changes.
#pragma once
#include "common.cuh"

__device__ __forceinline__ int eep_row_of(const u32* mask_row, int token) {
  int pos = 0;
  const int word = token >> 5;
  for (int w = 0; w < word; ++w) pos += __popc(mask_row[w]);
  return pos + __popc(mask_row[word] & ((1u << (token & 31)) - 1u));
}

extern "C" __global__ void __launch_bounds__(512) eep_dispatch(const EepParams p) {
  extern __shared__ u32 s_mask[];  // [num_slots][words]
  __shared__ int s_active[EEP_MAX_RANKS];
  __shared__ int s_ok[EEP_MAX_RANKS];
  __shared__ int s_last;

  const int S = (int)p.slots_per_rank, R = (int)p.num_ranks, M = (int)p.max_tokens;
  const int K = (int)p.top_k, T = (int)p.num_tokens, me = (int)p.my_rank;
  const int num_slots = S * R, words = (M + 31) >> 5;
  EepCtrl* ctrl = (EepCtrl*)p.ctrl;
  const u64* peer = (const u64*)p.peer_base;
  const i64* phys = (const i64*)p.phys;
  const u64 seq = *(volatile u64*)&ctrl->dispatch_seq + 1;

  // 1. layout
  for (int i = threadIdx.x; i < num_slots * words; i += blockDim.x) s_mask[i] = 0u;
  eep_load_active((const int*)p.active, s_active, R);
  __syncthreads();
  for (int e = threadIdx.x; e < T * K; e += blockDim.x) {
    int slot = eep_valid_slot(phys[e], num_slots, S, s_active);
    if (slot >= 0) atomicOr(&s_mask[slot * words + ((e / K) >> 5)], 1u << ((e / K) & 31));
  }
  __syncthreads();

  // 2. sends: work item = (entry, chunk of its row)
  const int lane = threadIdx.x & 31;
  const int warps_per_block = blockDim.x >> 5;
  const int num_items = T * K * EEP_DISPATCH_CHUNKS_PER_ROW;
#if EEP_USE_FP8
  const EepVec* x = (const EepVec*)p.stage;
  const float* stage_scale = (const float*)p.stage_scale;
#else
  const EepVec* x = (const EepVec*)p.x;
#endif
  int* handle_pos = (int*)p.handle_pos;
  for (int item = blockIdx.x * warps_per_block + (threadIdx.x >> 5); item < num_items;
       item += gridDim.x * warps_per_block) {
    const int e = item / EEP_DISPATCH_CHUNKS_PER_ROW, chunk = item % EEP_DISPATCH_CHUNKS_PER_ROW;
    const int token = e / K;
    const int slot = eep_valid_slot(phys[e], num_slots, S, s_active);
    if (slot < 0) {
      if (chunk == 0 && lane == 0) handle_pos[e] = -1;
      continue;
    }
    const int row = eep_row_of(&s_mask[slot * words], token);
    const int dst = slot / S, local = slot % S;
    const u64 block_row = ((u64)(local * R + me)) * M + row;  // row in [S, R, M]
    const u64 base = peer[dst];
    EepVec* dst_row = (EepVec*)(base + p.off_recv_x) + block_row * EEP_DISPATCH_VEC_PER_ROW;
    eep_copy_chunk<EEP_DISPATCH_VEC_PER_ROW>(dst_row, x + (u64)token * EEP_DISPATCH_VEC_PER_ROW, chunk, lane);
    if (chunk == 0 && lane == 0) {
      ((int*)(base + p.off_src_token))[block_row] = token;
#if EEP_USE_FP8
      ((float*)(base + p.off_recv_scale))[block_row] = stage_scale[token];
#endif
      handle_pos[e] = row;
    }
  }
  // raw counts, and src_token = -1 past each count: this source's column of every active
  // destination (spread over the whole grid, so the receiver has nothing left to fill)
  for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < num_slots * M; q += gridDim.x * blockDim.x) {
    const int slot = q / M, row = q % M, dst = slot / S;
    if (!eep_rank_active(s_active, dst)) continue;
    int count = 0;
    for (int w = 0; w < words; ++w) count += __popc(s_mask[slot * words + w]);
    const u64 block = (u64)((slot % S) * R + me);
    if (row == 0) ((int*)(peer[dst] + p.off_raw_count))[block] = count;
    if (row >= count) ((int*)(peer[dst] + p.off_src_token))[block * M + row] = -1;
  }

  // 3. last block: signal, bounded wait, publish counts
  if (!eep_arrive_last(&ctrl->dispatch_arrived, &s_last)) return;
  const u64 my_base = peer[me];
  eep_signal_and_wait(ctrl, peer, me, R, s_active, p.off_dispatch_flag, seq, ctrl->dispatch_ok, s_ok);
  __syncthreads();
  __threadfence();
  int* vis_count = (int*)p.vis_count;
  const int* raw_count = (const int*)(my_base + p.off_raw_count);
  int any_missing = 0;
  for (int src = 0; src < R; ++src) any_missing |= !s_ok[src];
  for (int pair = threadIdx.x; pair < S * R; pair += blockDim.x) {
    int n = s_ok[pair % R] ? eep_ld_volatile(&raw_count[pair]) : 0;
    vis_count[pair] = min(max(n, 0), M);
  }
  if (any_missing) {  // inactive or late sources: their columns hold stale rows, hide them all
    int* src_token = (int*)(my_base + p.off_src_token);
    for (u64 i = threadIdx.x; i < (u64)S * R * M; i += blockDim.x)
      if (!s_ok[(i / M) % R]) src_token[i] = -1;
  }
  if (threadIdx.x == 0) *(volatile u64*)&ctrl->dispatch_seq = seq;
}

// FP8 dispatch, step 0: quantize every token row once (one warp per row) into the local stage:
// scale = amax / 448 (1 when the row is all zeros), e4m3 = round-to-nearest(x / scale), the
// arithmetic torch does for `(x.float() / scale).to(torch.float8_e4m3fn)`.
extern "C" __global__ void __launch_bounds__(512) eep_quantize(const EepParams p) {
#if EEP_USE_FP8
  const int lane = threadIdx.x & 31;
  const int warps_per_block = blockDim.x >> 5;
  const EepVec* x = (const EepVec*)p.x;
  for (int token = blockIdx.x * warps_per_block + (threadIdx.x >> 5); token < (int)p.num_tokens;
       token += gridDim.x * warps_per_block) {
    const EepVec* row = x + (u64)token * EEP_VEC_PER_ROW;
    float amax = 0.f;
    for (int v = lane; v < EEP_VEC_PER_ROW; v += 32) {
      amax = fmaxf(amax, eep_bf16x8_absmax(row[v]));
    }
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
    const float scale = amax > 0.f ? __fdiv_rn(amax, 448.f) : 1.f;
    if (lane == 0) ((float*)p.stage_scale)[token] = scale;
    u32* out = (u32*)((unsigned char*)p.stage + (u64)token * EEP_HIDDEN);
    for (int v = lane; v < EEP_VEC_PER_ROW; v += 32)  // 8 bf16 in -> 8 e4m3 out (two u32)
      eep_quantize_bf16x8(row[v], scale, out + 2 * v);
  }
#endif
}

// ---- experimental decode path "pull" (KernelVariant.decode; docs/fused.md "Decode: where the time goes")
#ifndef EEP_DECODE_PULL
#define EEP_DECODE_PULL 0
#endif
#if EEP_DECODE_PULL
// FP8 dispatch, step 0, spread over the grid: one block per token row (eep_quantize gives each row
// one warp, so 128 tokens keep 8 SMs busy dividing 7168 elements per warp). Same arithmetic as
// eep_quantize (max is order-free, every element is divided by the same scale): bit-identical.
extern "C" __global__ void __launch_bounds__(512) eep_quantize_rows(const EepParams p) {
#if EEP_USE_FP8
  __shared__ float s_amax[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  const EepVec* x = (const EepVec*)p.x;
  for (int token = blockIdx.x; token < (int)p.num_tokens; token += gridDim.x) {
    const EepVec* row = x + (u64)token * EEP_VEC_PER_ROW;
    float amax = 0.f;
    for (int v = threadIdx.x; v < EEP_VEC_PER_ROW; v += blockDim.x) {
      amax = fmaxf(amax, eep_bf16x8_absmax(row[v]));
    }
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
    if (lane == 0) s_amax[warp] = amax;
    __syncthreads();
    amax = 0.f;
    for (int w = 0; w < num_warps; ++w) amax = fmaxf(amax, s_amax[w]);
    const float scale = amax > 0.f ? __fdiv_rn(amax, 448.f) : 1.f;
    if (threadIdx.x == 0) ((float*)p.stage_scale)[token] = scale;
    u32* out = (u32*)((unsigned char*)p.stage + (u64)token * EEP_HIDDEN);
    for (int v = threadIdx.x; v < EEP_VEC_PER_ROW; v += blockDim.x)  // 8 bf16 in -> 8 e4m3 out
      eep_quantize_bf16x8(row[v], scale, out + 2 * v);
    __syncthreads();  // s_amax is reused by the next token of this block
  }
#endif
}
#endif  // EEP_DECODE_PULL
