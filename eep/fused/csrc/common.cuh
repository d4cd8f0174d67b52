// eep fused data plane: definitions shared by the dispatch and combine kernels.
//
// Self-contained on purpose (no CUDA headers): NVRTC compiles it on a machine without the CUDA
// toolkit, from the nvidia-cuda-nvrtc wheel alone.
#pragma once

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned int u32;
typedef unsigned short u16;

#ifndef EEP_HIDDEN
#error "EEP_HIDDEN (elements per token row) must be defined by the compiler options"
#endif
#ifndef EEP_FIXED_MEMBERSHIP
#define EEP_FIXED_MEMBERSHIP 0  // 1: every rank always active, no mask reads (steady-state baseline)
#endif

#ifndef EEP_USE_FP8
#define EEP_USE_FP8 0  // 1: dispatch sends e4m3 rows plus one float32 scale per token row
#endif

#define EEP_MAX_RANKS 64
#define EEP_VEC_PER_ROW (EEP_HIDDEN / 8)        // 16-byte vectors (8 bf16) per token row
#if EEP_USE_FP8
#define EEP_DISPATCH_VEC_PER_ROW (EEP_HIDDEN / 16)  // 16 e4m3 per vector
#else
#define EEP_DISPATCH_VEC_PER_ROW EEP_VEC_PER_ROW
#endif
#ifndef EEP_VEC_PER_LANE_CHUNK
#define EEP_VEC_PER_LANE_CHUNK 4                // vectors one lane moves per chunk (64 B in flight)
#endif
#define EEP_VEC_PER_CHUNK (32 * EEP_VEC_PER_LANE_CHUNK)  // one warp moves 2 KiB per chunk
#define EEP_CHUNKS_PER_ROW ((EEP_VEC_PER_ROW + EEP_VEC_PER_CHUNK - 1) / EEP_VEC_PER_CHUNK)
#define EEP_DISPATCH_CHUNKS_PER_ROW ((EEP_DISPATCH_VEC_PER_ROW + EEP_VEC_PER_CHUNK - 1) / EEP_VEC_PER_CHUNK)

// Control block in local device memory: every field is u64 so the Python mirror is an int64
// tensor indexed by the constants in eep/fused/layout.py.
struct EepCtrl {
  u64 dispatch_seq;      // last completed dispatch step; the next launch uses +1
  u64 combine_seq;       // last completed combine step
  u64 timeout_ns;        // bound on every wait for a peer
  u64 epoch;             // membership epoch, written by set_membership (informational)
  u64 dispatch_arrived;  // blocks of the running dispatch that finished sending (reset by the last)
  u64 combine_arrived;   // same for combine_send
  u64 combine_ready_seq; // v2 combine: step whose incoming rows the waiting block has settled (others poll it)
  u64 combine_dropped;   // v2 combine: bit r = rank r gave up on this rank's tokens at that step's dispatch
  u64 dispatch_ok[EEP_MAX_RANKS];   // 1 when that source's tokens arrived in the last dispatch
  u64 combine_ok[EEP_MAX_RANKS];    // 1 when that expert rank's outputs arrived in the last combine
  u64 suspect[EEP_MAX_RANKS];       // 1 once the peer missed a deadline; no more waits for it
  u64 miss_count[EEP_MAX_RANKS];    // deadlines missed by that peer (status array)
  u64 last_miss_seq[EEP_MAX_RANKS]; // step sequence number of its latest miss
};

// Kernel parameters, passed by value as one struct of u64 (no padding questions across ABIs).
struct EepParams {
  u64 x;            // dispatch: [num_tokens, hidden] bf16; combine_send: y [S, R, M, hidden] bf16
  u64 phys;         // [num_tokens, top_k] int64 physical slots (NO_EXPERT = -1)
  u64 weights;      // [num_tokens, top_k] float32 (combine_reduce)
  u64 out;          // [num_tokens, hidden] bf16 (combine_reduce)
  u64 handle_pos;   // [max_tokens, top_k] int32 row inside the destination block, -1 if not sent
  u64 vis_count;    // [S, R] int32 counts this rank exposes after dispatch
  u64 ctrl;         // EepCtrl*
  u64 peer_base;    // [R] u64 base address of every rank's buffer in this process
  u64 active;       // [R] int32 membership mask
  u64 num_tokens, top_k, slots_per_rank, num_ranks, max_tokens, my_rank;
  u64 off_recv_x, off_src_token, off_raw_count, off_dispatch_flag, off_comb_x, off_combine_flag;
  u64 stage;        // FP8: [max_tokens, hidden] e4m3 rows quantized by eep_quantize
  u64 stage_scale;  // FP8: [max_tokens] float32 scale per row (x = e4m3 * scale)
  u64 off_recv_scale;  // FP8: [S, R, M] float32 in every rank's buffer
};

// Prefill-mode kernel parameters (csrc/prefill.cuh, csrc/prefill_v2.cuh), every field u64.
struct EepPrefillParams {
  u64 x;          // dispatch: [num_tokens, hidden] bf16; combine: partial [R, M, hidden] bf16
  u64 phys;       // [num_tokens, top_k] int64 physical slots (NO_EXPERT = -1)
  u64 weights;    // [num_tokens, top_k] float32 top-k weights
  u64 out;        // combine: [num_tokens, hidden] bf16
  u64 dst_row;    // [max_tokens, R] int32: row of token t in destination d's region for this source
  u64 vis_count;  // [R] int32 rows from each source visible after dispatch
  u64 ctrl;       // EepCtrl* (a prefill buffer has its own)
  u64 peer_base;  // [R] u64
  u64 active;     // [R] int32
  u64 num_tokens, top_k, slots_per_rank, num_ranks, max_tokens, my_rank;
  u64 off_recv_x, off_comb_x, off_src_token, off_local_slot, off_weight, off_raw_count;
  u64 off_dispatch_flag, off_combine_flag;
};

struct __align__(16) EepVec { u32 a, b, c, d; };

__device__ __forceinline__ u64 eep_globaltimer() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ u64 eep_ld_acquire_sys(const u64* p) {
  u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void eep_st_release_sys(u64* p, u64 v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ int eep_ld_volatile(const int* p) { return *(const volatile int*)p; }

__device__ __forceinline__ float eep_bf16_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float eep_bf16_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }

// Round to nearest even, as torch's float -> bfloat16 conversion does; NaN stays a quiet NaN.
__device__ __forceinline__ u32 eep_f32_to_bf16(float f) {
  u32 u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return ((u >> 16) | 0x40u) & 0xffffu;
  u += 0x7fffu + ((u >> 16) & 1u);
  return u >> 16;
}

__device__ __forceinline__ bool eep_rank_active(const int* s_active, int rank) {
#if EEP_FIXED_MEMBERSHIP
  return true;
#else
  return s_active[rank] != 0;
#endif
}

// The membership mask into shared memory (all ones in the fixed-membership variant).
__device__ __forceinline__ void eep_load_active(const int* active, int* s_active, int R) {
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
#if EEP_FIXED_MEMBERSHIP
    s_active[r] = 1;
#else
    s_active[r] = active[r];
#endif
  }
}

// Ranks whose combine rows a reduce may read: their outputs arrived and (elastic) they are active.
__device__ __forceinline__ void eep_load_arrived(const EepCtrl* ctrl, const int* active, int* s_use, int R) {
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    int ok = (int)ctrl->combine_ok[r];
#if !EEP_FIXED_MEMBERSHIP
    ok = ok && active[r];
#endif
    s_use[r] = ok;
  }
}

// Combine send, for an active source this rank gave up on at dispatch (its dispatch_ok is 0): that
// source still reads this rank's rows of its comb_x (it cannot know it was dropped), so they are
// overwritten with zeros — a zero row adds exactly nothing to its float32 sum, the "contribution
// absent" of a missed peer — instead of leaving rows of an earlier step there. `region` is this
// rank's region in the source's comb_x, `num_vecs` its size in 16-byte vectors. Runs only after a
// missed deadline: the common step pays one ctrl read per source.
__device__ __forceinline__ void eep_zero_dropped_sources(const EepCtrl* ctrl, const u64* peer, const int* s_active,
                                                         int R, u64 off_region, u64 num_vecs) {
  for (int src = 0; src < R; ++src) {
    if (!eep_rank_active(s_active, src) || ctrl->dispatch_ok[src]) continue;
    EepVec* to = (EepVec*)(peer[src] + off_region);
    const EepVec zero = {0u, 0u, 0u, 0u};
    for (u64 v = (u64)blockIdx.x * blockDim.x + threadIdx.x; v < num_vecs; v += (u64)gridDim.x * blockDim.x)
      to[v] = zero;
  }
}

// Physical slot of entry e if it is to be sent, else -1 (NO_EXPERT, garbage, or inactive host).
__device__ __forceinline__ int eep_valid_slot(i64 phys, int num_slots, int slots_per_rank,
                                              const int* s_active) {
  if (phys < 0 || phys >= num_slots) return -1;
  int slot = (int)phys;
  return eep_rank_active(s_active, slot / slots_per_rank) ? slot : -1;
}

// One warp copies chunk `chunk` of a row of kVecPerRow 16-byte vectors (lanes interleaved).
template <int kVecPerRow>
__device__ __forceinline__ void eep_copy_chunk(EepVec* dst, const EepVec* src, int chunk, int lane) {
  EepVec v[EEP_VEC_PER_LANE_CHUNK];
  const int base = chunk * EEP_VEC_PER_CHUNK + lane;
#pragma unroll
  for (int i = 0; i < EEP_VEC_PER_LANE_CHUNK; ++i) {
    int idx = base + i * 32;
    if (idx < kVecPerRow) v[i] = src[idx];
  }
#pragma unroll
  for (int i = 0; i < EEP_VEC_PER_LANE_CHUNK; ++i) {
    int idx = base + i * 32;
    if (idx < kVecPerRow) dst[idx] = v[i];
  }
}

// acc[0..8) += w * (8 bf16 of val): mul then add, each rounded, as the reference computes.
__device__ __forceinline__ void eep_accumulate(float* acc, float w, const EepVec& val) {
  const u32 words[4] = {val.a, val.b, val.c, val.d};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc[2 * i] = __fadd_rn(acc[2 * i], __fmul_rn(w, eep_bf16_lo(words[i])));
    acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], __fmul_rn(w, eep_bf16_hi(words[i])));
  }
}

// Eight float32 sums rounded (to nearest even) into one vector of eight bf16.
__device__ __forceinline__ EepVec eep_pack_bf16x8(const float* acc) {
  EepVec o;
  o.a = eep_f32_to_bf16(acc[0]) | (eep_f32_to_bf16(acc[1]) << 16);
  o.b = eep_f32_to_bf16(acc[2]) | (eep_f32_to_bf16(acc[3]) << 16);
  o.c = eep_f32_to_bf16(acc[4]) | (eep_f32_to_bf16(acc[5]) << 16);
  o.d = eep_f32_to_bf16(acc[6]) | (eep_f32_to_bf16(acc[7]) << 16);
  return o;
}

// Record that `peer` missed the deadline of step `seq` (the runtime reads this as evidence).
__device__ __forceinline__ void eep_record_miss(EepCtrl* ctrl, int peer, u64 seq) {
  atomicAdd(&ctrl->miss_count[peer], 1ull);
  atomicMax(&ctrl->last_miss_seq[peer], seq);
  atomicExch(&ctrl->suspect[peer], 1ull);
}

// Wait until *flag == seq or the deadline passes; returns whether it arrived. Suspects are not
// waited for: a dead peer costs one timeout, not one per step.
__device__ __forceinline__ bool eep_wait_flag(EepCtrl* ctrl, const u64* flag, int peer, u64 seq) {
  if (*(volatile u64*)&ctrl->suspect[peer]) return false;
  const u64 deadline = eep_globaltimer() + *(volatile u64*)&ctrl->timeout_ns;
  while (true) {
    if (eep_ld_acquire_sys(flag) == seq) return true;
    if (eep_globaltimer() > deadline) {
      eep_record_miss(ctrl, peer, seq);
      return false;
    }
  }
}

// The last block's handshake of a launch: raise this rank's flag (step `seq`) in every active
// peer's `off_flag` array (release, system scope), then wait a bounded time for every active peer's
// flag in this rank's own array. ok_out[r] (device status, and s_ok[r] if given) says whether peer r
// arrived; inactive peers count as not arrived. One definition for every mode's kernels.
__device__ __forceinline__ void eep_signal_and_wait(EepCtrl* ctrl, const u64* peer, int me, int R,
                                                    const int* s_active, u64 off_flag, u64 seq, u64* ok_out,
                                                    int* s_ok) {
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    if (!eep_rank_active(s_active, r)) continue;
    __threadfence_system();
    eep_st_release_sys((u64*)(peer[r] + off_flag) + me, seq);
  }
  const u64* mine = (const u64*)(peer[me] + off_flag);
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    bool ok = false;
    if (eep_rank_active(s_active, r)) ok = eep_wait_flag(ctrl, mine + r, r, seq);
    if (s_ok != nullptr) s_ok[r] = ok;
    ok_out[r] = ok;
  }
}

// The end of every combine launch (one block): raise this rank's flag `seq` on every active peer,
// wait a bounded time for theirs (combine_ok), then advance this rank's combine_seq, the value the
// next launch derives its `seq` from.
__device__ __forceinline__ void eep_combine_handshake(EepCtrl* ctrl, const u64* peer, int me, int R,
                                                      const int* s_active, u64 off_flag, u64 seq) {
  eep_signal_and_wait(ctrl, peer, me, R, s_active, off_flag, seq, ctrl->combine_ok, nullptr);
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    *(volatile u64*)&ctrl->combine_seq = seq;
  }
}

// Every block calls this after its sends; returns true in exactly one block (the last), after
// all other blocks' writes are ordered before anything that block does next.
__device__ __forceinline__ bool eep_arrive_last(u64* counter, int* s_flag) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    u64 old = atomicAdd(counter, 1ull);
    *s_flag = (old == (u64)gridDim.x - 1);
    if (*s_flag) {
      *counter = 0;  // no other block of this launch touches it again; next launch is stream-ordered
      __threadfence_system();
    }
  }
  __syncthreads();
  return *s_flag != 0;
}

// Exclusive prefix sum of vals[0..n) into out[0..n], out[n] = total. Whole block (blockDim a
// multiple of 32); each thread sums a contiguous run, then warp shuffles scan the run totals.
__device__ void eep_block_exclusive_scan(const int* vals, int* out, int n, int* s_warp) {
  const int per = (n + blockDim.x - 1) / blockDim.x;
  const int lo = min(n, (int)threadIdx.x * per), hi = min(n, lo + per);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  int sum = 0;
  for (int i = lo; i < hi; ++i) sum += vals[i];
  int incl = sum;  // inclusive scan inside the warp
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    int up = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += up;
  }
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int total = lane < num_warps ? s_warp[lane] : 0;
    int wincl = total;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      int up = __shfl_up_sync(0xffffffffu, wincl, d);
      if (lane >= d) wincl += up;
    }
    if (lane < num_warps) s_warp[lane] = wincl - total;  // exclusive warp offsets
    if (lane == num_warps - 1) out[n] = wincl;
  }
  __syncthreads();
  int run = s_warp[warp] + incl - sum;
  for (int i = lo; i < hi; ++i) {
    out[i] = run;
    run += vals[i];
  }
  __syncthreads();
}

// Largest |value| of 8 bf16 (one 16-byte vector): the row amax of the FP8 quantizers.
__device__ __forceinline__ float eep_bf16x8_absmax(const EepVec& val) {
  const u32 words[4] = {val.a, val.b, val.c, val.d};
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) amax = fmaxf(amax, fmaxf(fabsf(eep_bf16_lo(words[i])), fabsf(eep_bf16_hi(words[i]))));
  return amax;
}

// 8 bf16 -> 8 e4m3 (two u32 at `out`), each divided by `scale` and rounded to nearest, saturating.
__device__ __forceinline__ void eep_quantize_bf16x8(const EepVec& val, float scale, u32* out) {
  const u32 words[4] = {val.a, val.b, val.c, val.d};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    unsigned short lo, hi;  // cvt packs its first operand into the upper byte
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo)
        : "f"(__fdiv_rn(eep_bf16_hi(words[2 * h]), scale)), "f"(__fdiv_rn(eep_bf16_lo(words[2 * h]), scale)));
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi)
        : "f"(__fdiv_rn(eep_bf16_hi(words[2 * h + 1]), scale)), "f"(__fdiv_rn(eep_bf16_lo(words[2 * h + 1]), scale)));
    out[h] = (u32)lo | ((u32)hi << 16);
  }
}

// The rows a combine moves: s_rows[pair] = rows of (slot, source) block `pair` (its dispatch count,
// 0 for inactive sources and for source `skip_src`, -1 for none), s_start = their exclusive prefix
// sum; returns the total. Whole block.
__device__ __forceinline__ int eep_sent_rows_table(const EepParams& p, const int* s_active, int skip_src, int* s_rows,
                                                   int* s_start, int* s_warp) {
  const int R = (int)p.num_ranks, M = (int)p.max_tokens, num_pairs = (int)p.slots_per_rank * R;
  const int* vis_count = (const int*)p.vis_count;
  for (int pair = threadIdx.x; pair < num_pairs; pair += blockDim.x)
    s_rows[pair] = eep_rank_active(s_active, pair % R) && pair % R != skip_src ? min(max(vis_count[pair], 0), M) : 0;
  __syncthreads();
  eep_block_exclusive_scan(s_rows, s_start, num_pairs, s_warp);
  return s_start[num_pairs];
}

// The block of compact row r: the last pair whose start <= r (binary search over s_start).
__device__ __forceinline__ int eep_pair_of_row(const int* s_start, int num_pairs, int r) {
  int lo = 0, hi = num_pairs - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (s_start[mid] <= r) lo = mid; else hi = mid - 1;
  }
  return lo;
}
