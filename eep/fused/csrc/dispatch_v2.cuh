// Kernel set v2, low-latency dispatch: the receive layout of eep/reference/dispatch.py exactly
// (rows of a (slot, source) block in ascending source-token order, src_token -1 past each count,
// counts, FP8 rows + one float32 scale per row), in ONE launch for bf16 and FP8 alike.
//
// Block b of G owns a contiguous range of tokens and a contiguous range of slots:
//   0. it issues every load that depends on nothing else at once (mask and peer table first, then
//      control block, the first routing entries of each thread): the step's fixed cost is a chain of
//      round trips, so independent ones overlap; its first token's row goes out once those have
//      landed (issued with them, 14 KB of row per block at hidden 7168 slowed them down);
//   1. it reads the routing table once (T x top_k int64, every thread on consecutive entries) and
//      keeps only what it writes: per slot, how many tokens before its range chose it (where its
//      tokens' rows start), and the totals of the slots it owns (their counts and -1 tails);
//   2. one warp assigns its tokens' rows in token order;
//   3. each of its tokens is read once, the next one's row in flight meanwhile (FP8: the whole block
//      takes the row's amax and quantizes it, x / (amax / 448) rounded to e4m3, the arithmetic of
//      eep_quantize and torch), then stored once per choice into the destination's receive block
//      (NVLink stores to peers);
//   4. it writes the counts and -1 tails of its slots, then raises its flag in every other active
//      rank (its flag in its own rank was raised at launch, step 0: it only says the block has read
//      the step);
//   5. the last block waits (bounded) for every source's flags, publishes the counts of the sources
//      that arrived (this rank's own from its shared memory: it counted every token), hides the rest,
//      and advances dispatch_seq (every block has read it by then: it saw their flags).
#pragma once
#include "signals_v2.cuh"

#define EEP2_ROUTE_PREFETCH 4  // routing entries per thread loaded at launch (2,048 per block: 256 tokens of top-8)
#define EEP2_ROW_VECS ((EEP_DISPATCH_VEC_PER_ROW + EEP2_THREADS - 1) / EEP2_THREADS)  // sent vectors per thread
#if EEP_USE_FP8
#define EEP2_IN_VECS (2 * EEP2_ROW_VECS)  // sent vector q is read from bf16 vectors 2q and 2q + 1
#else
#define EEP2_IN_VECS EEP2_ROW_VECS
#endif

// Dynamic shared memory of eep2_dispatch, in int32 words (layout.dispatch_v2_smem_bytes mirrors it).
__device__ __forceinline__ int eep2_dispatch_tokens_per_block(int M, int G) { return (M + G - 1) / G; }
__device__ __forceinline__ int eep2_dispatch_slots_per_block(int num_slots, int G) { return (num_slots + G - 1) / G; }
// Start of part b of n items split evenly over G parts, b * n / G, in 32-bit arithmetic: a dispatch
// grid has at most EEP_MAX_SIGNAL_BLOCKS = 256 blocks, so any n < 2^24 fits. A 64-bit division is a
// call the compiler does not schedule loads across, and it made each warp wait for the launch
// loads before its ranges were known.
__device__ __forceinline__ int eep2_split(int b, int n, int G) { return (int)((u32)b * (u32)n / (u32)G); }

// The bf16 vectors of token t this thread sends (FP8: the pairs it quantizes), loaded without waiting.
__device__ __forceinline__ void eep2_load_row(const EepVec* x, int t, EepVec* in) {
  const EepVec* xrow = x + (u64)t * EEP_VEC_PER_ROW;
#pragma unroll
  for (int j = 0; j < EEP2_ROW_VECS; ++j) {
    const int q = threadIdx.x + j * EEP2_THREADS;
    if (q < EEP_DISPATCH_VEC_PER_ROW) {
#if EEP_USE_FP8
      in[2 * j] = xrow[2 * q];
      in[2 * j + 1] = xrow[2 * q + 1];
#else
      in[j] = xrow[q];
#endif
    }
  }
}

extern "C" __global__ void __launch_bounds__(EEP2_THREADS, 1) eep2_dispatch(const EepParams p, const EepSignals sig) {
  // s_slot_dst[NS] | s_next[NS] (rows taken so far per slot) | s_total[spb] | s_dst[tpb*K] | s_brow[tpb*K] |
  // s_sent[tpb] (the token goes somewhere)
  extern __shared__ int s_dyn[];
  __shared__ int s_active[EEP_MAX_RANKS];
  __shared__ u64 s_peer[EEP_MAX_RANKS];
  __shared__ int s_ok[EEP_MAX_RANKS];
#if EEP_USE_FP8
  __shared__ float s_amax[EEP2_THREADS / 32];
#endif

  const int S = (int)p.slots_per_rank, R = (int)p.num_ranks, M = (int)p.max_tokens;
  const int K = (int)p.top_k, T = (int)p.num_tokens, me = (int)p.my_rank, NS = S * R;
  const int G = gridDim.x, b = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  EepCtrl* ctrl = (EepCtrl*)p.ctrl;
  const i64* phys = (const i64*)p.phys;
  const EepVec* x = (const EepVec*)p.x;
  int* handle_pos = (int*)p.handle_pos;

  eep2_launch_dependents();  // the combine's launch may overlap this grid's tail (PDL only)
  eep2_grid_wait();          // PDL: the previous kernel's writes (x, phys, the mask) are visible from here on
  // 0. every load that depends on nothing else, issued before anything waits (one round trip, not
  //    one per step below) and before the block's ranges are computed: the mask and peer table first
  //    (the routing pass waits for them), the control block, this thread's first routing entries
  const Eep2Launch launch = eep2_issue_state((const int*)p.active, (const u64*)p.peer_base, R);
  const Eep2Ctrl c = eep2_read_ctrl(ctrl, R);
  const int TK = T * K;  // routing entries; entry e = t * K + k is token t's choice k
  i64 first_entries[EEP2_ROUTE_PREFETCH];
#pragma unroll
  for (int j = 0; j < EEP2_ROUTE_PREFETCH; ++j) {
    const int e = threadIdx.x + j * EEP2_THREADS;
    first_entries[j] = e < TK ? phys[e] : -1;
  }
  const int t0 = eep2_split(b, T, G), t1 = eep2_split(b + 1, T, G);
  const int s0 = eep2_split(b, NS, G), s1 = eep2_split(b + 1, NS, G);
  const int tpb = eep2_dispatch_tokens_per_block(M, G), spb = eep2_dispatch_slots_per_block(NS, G);
  int* s_slot_dst = s_dyn;
  int* s_next = s_slot_dst + NS;
  int* s_total = s_next + NS;
  int* s_dst = s_total + spb;
  int* s_brow = s_dst + tpb * K;
  int* s_sent = s_brow + tpb * K;

  for (int i = threadIdx.x; i < NS; i += blockDim.x) s_next[i] = 0;
  for (int i = threadIdx.x; i < spb; i += blockDim.x) s_total[i] = 0;
  const u64 seq = c.dispatch_seq + 1;
  eep2_raise_own(launch, me, sig.off_dispatch_signal, seq, G);  // "read the step": nothing to order
  const bool any_remote = eep2_store_state(launch, me, R, S, NS, s_active, s_peer, s_slot_dst);
  // the first token's row, now that the launch loads have landed: issued with them it competed with
  // them (A/B on one H100: deepseek-v3 0.4-0.7 us slower per step, perf/RESULTS.md), and the routing
  // pass below hides its round trip
  EepVec row[EEP2_IN_VECS];
  if (t0 < t1) eep2_load_row(x, t0, row);

  // 1. one pass over the routing table, every thread of the block on consecutive entries (T x K
  //    entries over 512 threads: two each at 128 tokens of top-8, not eight on a quarter of the
  //    block): rows before this block's tokens, totals of its slots, its tokens' destinations
  const int own0 = t0 * K, own1 = t1 * K;
  for (int e0 = 0; e0 < TK; e0 += EEP2_ROUTE_PREFETCH * EEP2_THREADS) {
    i64 slot[EEP2_ROUTE_PREFETCH];
#pragma unroll
    for (int j = 0; j < EEP2_ROUTE_PREFETCH; ++j) {
      const int e = e0 + threadIdx.x + j * EEP2_THREADS;
      slot[j] = e0 == 0 ? first_entries[j] : (e < TK ? phys[e] : -1);
    }
#pragma unroll
    for (int j = 0; j < EEP2_ROUTE_PREFETCH; ++j) {
      const int e = e0 + threadIdx.x + j * EEP2_THREADS;
      if (e >= TK) break;
      const bool sent = eep2_entry_rank(slot[j], NS, s_slot_dst) >= 0;
      if (e >= own0 && e < own1) s_dst[e - own0] = sent ? (int)slot[j] : -1;
      if (!sent) continue;
      if (e < own0) atomicAdd(&s_next[(int)slot[j]], 1);
      if (slot[j] >= s0 && slot[j] < s1) atomicAdd(&s_total[(int)slot[j] - s0], 1);
    }
  }
  __syncthreads();

  // 2. this block's tokens take their rows in token order (a token reaches a slot at most once)
  if (warp == 0) {
    for (int i = 0; i < t1 - t0; ++i) {
      if (lane < K) {
        const int slot = s_dst[i * K + lane];
        int row = -1, dst = -1, brow = 0;
        if (slot >= 0) {
          row = s_next[slot]++;
          dst = s_slot_dst[slot];
          brow = ((slot - dst * S) * R + me) * M + row;  // row in the destination's [S, R, M]
        }
        s_dst[i * K + lane] = dst;
        s_brow[i * K + lane] = brow;
        handle_pos[(t0 + i) * K + lane] = row;
      }
      const bool sent = __any_sync(0xffffffffu, lane < K && s_dst[i * K + lane] >= 0);
      if (lane == 0) s_sent[i] = sent;
      __syncwarp();
    }
  }
  __syncthreads();

  // 3. each token read once (the next token's row is loaded while this one is stored), stored once
  //    per choice
  for (int i = 0; i < t1 - t0; ++i) {
    EepVec next[EEP2_IN_VECS];
    if (t0 + i + 1 < t1) eep2_load_row(x, t0 + i + 1, next);
    if (s_sent[i]) {  // else every choice NO_EXPERT or on an inactive rank (block-uniform)
      const int t = t0 + i;
      EepVec v[EEP2_ROW_VECS];
#if EEP_USE_FP8
      float amax = 0.f;
#pragma unroll
      for (int j = 0; j < EEP2_ROW_VECS; ++j)
        if (threadIdx.x + j * EEP2_THREADS < EEP_DISPATCH_VEC_PER_ROW)
          amax = fmaxf(amax, fmaxf(eep_bf16x8_absmax(row[2 * j]), eep_bf16x8_absmax(row[2 * j + 1])));
#pragma unroll
      for (int d = 16; d > 0; d >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
      if (lane == 0) s_amax[warp] = amax;
      __syncthreads();
      amax = 0.f;
#pragma unroll
      for (int w = 0; w < EEP2_THREADS / 32; ++w) amax = fmaxf(amax, s_amax[w]);
      const float scale = amax > 0.f ? __fdiv_rn(amax, 448.f) : 1.f;
#pragma unroll
      for (int j = 0; j < EEP2_ROW_VECS; ++j) {
        if (threadIdx.x + j * EEP2_THREADS < EEP_DISPATCH_VEC_PER_ROW) {
          u32 words[4];
          eep_quantize_bf16x8(row[2 * j], scale, words);
          eep_quantize_bf16x8(row[2 * j + 1], scale, words + 2);
          v[j] = EepVec{words[0], words[1], words[2], words[3]};
        }
      }
      __syncthreads();  // s_amax is reused by the next token
#else
#pragma unroll
      for (int j = 0; j < EEP2_ROW_VECS; ++j) v[j] = row[j];
#endif
      for (int k = 0; k < K; ++k) {
        const int dst = s_dst[i * K + k];
        if (dst < 0) continue;
        const u64 brow = (u64)s_brow[i * K + k];
        EepVec* to = (EepVec*)(s_peer[dst] + p.off_recv_x) + brow * EEP_DISPATCH_VEC_PER_ROW;
#pragma unroll
        for (int j = 0; j < EEP2_ROW_VECS; ++j) {
          const int q = threadIdx.x + j * EEP2_THREADS;
          if (q < EEP_DISPATCH_VEC_PER_ROW) to[q] = v[j];
        }
        if (threadIdx.x == k) {  // one thread per choice: the row's source token (and scale)
          ((int*)(s_peer[dst] + p.off_src_token))[brow] = t;
#if EEP_USE_FP8
          ((float*)(s_peer[dst] + p.off_recv_scale))[brow] = scale;
#endif
        }
      }
    }
#pragma unroll
    for (int j = 0; j < EEP2_IN_VECS; ++j) row[j] = next[j];
  }

  // 4. counts and -1 tails of this block's slots, then this block's flags
  for (int j = warp; j < s1 - s0; j += blockDim.x >> 5) {
    const int slot = s0 + j, dst = s_slot_dst[slot];
    if (dst < 0) continue;
    const int count = s_total[j], block = (slot - dst * S) * R + me;
    if (lane == 0) ((int*)(s_peer[dst] + p.off_raw_count))[block] = count;
    int* src_token = (int*)(s_peer[dst] + p.off_src_token) + (u64)block * M;
    for (int row = count + lane; row < M; row += 32) src_token[row] = -1;
  }
  if (any_remote) eep2_raise(s_peer, me, R, s_active, sig.off_dispatch_signal, seq, G, false);
  if (b != G - 1) return;

  // 5. the last block: wait for every source, publish what arrived, hide what did not
  eep2_dispatch_arrivals(ctrl, c, me, R, s_active, s_peer[me], sig.off_dispatch_signal, seq, s_ok);
  // this rank's own counts are in s_next already: the last block counted every token before its
  // range and then its own (t1 = T), the count the slot's owning block wrote into raw_count; only
  // other sources' counts are read back
  int* vis_count = (int*)p.vis_count;
  const int* raw_count = (const int*)(s_peer[me] + p.off_raw_count);
  for (int pair = threadIdx.x; pair < NS; pair += blockDim.x) {
    const int src = pair % R;
    int count = 0;
    if (src == me) count = s_next[me * S + pair / R];
    else if (s_ok[src]) count = eep_ld_volatile(&raw_count[pair]);
    vis_count[pair] = s_ok[src] ? min(max(count, 0), M) : 0;
  }
  // sources that are inactive or missed: their columns may hold an earlier step's rows, hide them
  // (a loop over sources, uniform over the block: when every source arrived, R shared-memory reads
  // and no per-pair division)
  int* src_token = (int*)(s_peer[me] + p.off_src_token);
  for (int src = 0; src < R; ++src) {
    if (s_ok[src]) continue;
    for (int local = warp; local < S; local += blockDim.x >> 5)
      for (int row = lane; row < M; row += 32) src_token[((u64)local * R + src) * M + row] = -1;
  }
  __syncthreads();
  if (threadIdx.x == 0) *(volatile u64*)&ctrl->dispatch_seq = seq;
}
