// Kernel set v2 (KernelVariant.kernels = "v2"): what its dispatch and combine kernels share.
//
// Signalling. Every sending block raises its own flag in every other active destination as soon as
// its rows have landed, and (dispatch) in its own rank at launch, where the flag only says that the
// block has read the step: one u64 per (source rank, sending block) in the destination's buffer
// ([R][EEP_MAX_SIGNAL_BLOCKS], the `dispatch_signal` / `combine_signal` regions). No block waits for
// the rest of its grid before anything is signalled, and there is no block counter. A flag's value
// carries the step, the sender's grid size (so the receiver knows how many flags to expect, whatever
// grid each rank launched) and, for combine, whether the sender gave up on the receiver's tokens at
// that step's dispatch. Values only grow with the step, so a late flag of an old step never matches
// (the flag keeps a tag's low 48 bits: two tags match only 2^48 apart, 256 epochs).
//
// Waiting. One block per launch (the "waiter") waits, bounded by one deadline, for every expected
// source's flags and records misses exactly as the v1 kernels do (miss_count, last_miss_seq,
// suspect; a suspect is not waited for again). It polls every flag of a source at once (relaxed
// system-scope loads, a lane has up to 8 in flight) and acquires once, with a fence, after all of
// them carried the step: one round trip per poll instead of one per flag. Another rank's flags are
// released and acquired at system scope; a rank's own dispatch flags order nothing and are neither
// (eep2_raise_own). Blocks only ever wait on
// other ranks or on blocks of their own grid with a lower index (dispatch: the last block waits for
// the others; combine: the reducing blocks wait for the first reducing block). The hardware dispatches a grid's blocks in
// index order, so a waiting block never holds a slot a block it waits for still needs (the same
// property a decoupled look-back scan relies on); every wait is bounded regardless.
#pragma once
#include "common.cuh"

#define EEP_MAX_SIGNAL_BLOCKS 256  // flags per (destination, source): the most sending blocks a v2 launch has
#define EEP2_THREADS 512           // every v2 kernel runs 512-thread blocks (layout.THREADS_PER_BLOCK)
#define EEP_SIGNAL_DROPPED (1ull << 15)
#define EEP_SIGNAL_BLOCKS_MASK 0x7fffull

// The second kernel parameter of every v2 kernel (layout.SignalParams mirrors it).
struct EepSignals {
  u64 off_dispatch_signal;  // [R(src)][EEP_MAX_SIGNAL_BLOCKS] u64 in every rank's buffer
  u64 off_combine_signal;   // same, for combine
  u64 num_send_blocks;      // combine: blocks [0, num_send_blocks) push rows home, the rest reduce
};

// A flag: step in bits 63..16, "dropped" in bit 15, the sender's number of sending blocks in 14..0.
__device__ __forceinline__ u64 eep2_signal_value(u64 seq, bool dropped, int num_blocks) {
  return (seq << 16) | (dropped ? EEP_SIGNAL_DROPPED : 0ull) | (u64)num_blocks;
}

// The step a flag of step `seq` carries: its low 48 bits (a tag's epoch reaches bit 48 from epoch
// 255 on, and comparing the whole tag would then never match).
__device__ __forceinline__ u64 eep2_signal_step(u64 seq) { return seq & ((1ull << 48) - 1); }

// What a block reads from the control block, issued with its first loads so that their latency
// overlaps instead of adding up (nothing else writes these while the kernel runs: only this rank's
// earlier kernels and the host, in stream order). Thread r < R holds rank r's entries.
struct Eep2Ctrl {
  u64 dispatch_seq;  // the last completed dispatch step
  u64 timeout_ns;
  u64 suspect;       // suspect[threadIdx.x]
  u64 dispatch_ok;   // dispatch_ok[threadIdx.x]
};

__device__ __forceinline__ Eep2Ctrl eep2_read_ctrl(const EepCtrl* ctrl, int R) {
  Eep2Ctrl c;
  c.dispatch_seq = *(const volatile u64*)&ctrl->dispatch_seq;
  c.timeout_ns = *(const volatile u64*)&ctrl->timeout_ns;
  const bool mine = (int)threadIdx.x < R;
  c.suspect = mine ? *(const volatile u64*)&ctrl->suspect[threadIdx.x] : 0ull;
  c.dispatch_ok = mine ? *(const volatile u64*)&ctrl->dispatch_ok[threadIdx.x] : 0ull;
  return c;
}

// Programmatic dependent launch (PDL; FusedBuffer(pdl=True) launches the decode kernels with the
// programmatic-stream-serialization attribute, docs/fused.md "Programmatic dependent launch"). Such a
// launch may start while the kernel before it in the stream still runs; eep2_grid_wait returns once
// that kernel has completed and its writes are visible, so a kernel calls it before its first global
// load or store, and nothing it does before depends on earlier work. Without the attribute (or
// before sm_90) both are no-ops: the launch already started after the previous kernel ended.
__device__ __forceinline__ void eep2_grid_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next PDL-launched kernel in the stream start its blocks (once every block of this grid
// has called it or exited); they wait in eep2_grid_wait until this grid has completed, so calling it
// first thing only lets their launch overlap this grid's tail (the dispatch's waiting block).
__device__ __forceinline__ void eep2_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// A 16-byte load that never hits a line cached in L1 (data other GPUs write during this kernel).
__device__ __forceinline__ EepVec eep2_ld_cg(const EepVec* ptr) {
  EepVec v;
  asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.a), "=r"(v.b), "=r"(v.c), "=r"(v.d) : "l"(ptr));
  return v;
}

// The launch state's global loads: thread r < R reads rank r's mask word and peer base (R <=
// EEP_MAX_RANKS <= blockDim). Every kernel issues them before any other load: the mask gates the
// routing pass, and a load issued after a block's row loads queues behind them (the aware variant
// then waited for the rows before it could route; the fixed variant, which reads no mask, did not).
struct Eep2Launch {
  int active;  // rank threadIdx.x is a member (1 in the fixed-membership variant)
  u64 peer;    // rank threadIdx.x's buffer in this process
};

__device__ __forceinline__ Eep2Launch eep2_issue_state(const int* active, const u64* peer_base, int R) {
  Eep2Launch l = {0, 0ull};
  const int r = threadIdx.x;
  if (r < R) {
#if EEP_FIXED_MEMBERSHIP
    l.active = 1;
#else
    l.active = *(const volatile int*)&active[r];
#endif
    l.peer = *(const volatile u64*)&peer_base[r];
  }
  return l;
}

// Launch state in shared memory, from the loads of eep2_issue_state: the membership mask, the peer
// table, and slot -> destination rank (-1 when the slot's rank is inactive; the fixed-membership
// variant fills every entry), so checking a routing entry costs one shared-memory read in both
// variants. Returns whether any rank other than `me` is active (block-uniform). Whole block; ends
// with a barrier.
__device__ __forceinline__ bool eep2_store_state(const Eep2Launch& l, int me, int R, int S, int num_slots,
                                                 int* s_active, u64* s_peer, int* s_slot_dst) {
  const int r = threadIdx.x;
  if (r < R) {
    s_active[r] = l.active;
    s_peer[r] = l.peer;
  }
  const bool any_remote = __syncthreads_or(r < R && r != me && l.active != 0) != 0;
  if (s_slot_dst != nullptr) {
    for (int slot = threadIdx.x; slot < num_slots; slot += blockDim.x) {
      const int d = slot / S;
      s_slot_dst[slot] = eep_rank_active(s_active, d) ? d : -1;
    }
    __syncthreads();
  }
  return any_remote;
}

// Destination rank of a routing entry, -1 when it is not sent (NO_EXPERT, out of range, inactive host).
__device__ __forceinline__ int eep2_entry_rank(i64 phys, int num_slots, const int* s_slot_dst) {
  return (phys < 0 || phys >= num_slots) ? -1 : s_slot_dst[(int)phys];
}

// The up-to-8 routing entries k0..k0+7 of token t (-1 past top_k), every load issued before any is used.
__device__ __forceinline__ void eep2_load_choices(const i64* phys, int t, int K, int k0, i64* out) {
#pragma unroll
  for (int u = 0; u < 8; ++u) out[u] = k0 + u < K ? phys[(i64)t * K + k0 + u] : -1;
}

// A dispatch block's flag in its own rank, raised at launch by thread `me` once it holds the step
// (`launch`: its peer-table entry is this rank's buffer). It says only "this block has read
// dispatch_seq", so the waiter may advance it once every flag is in: nothing in a dispatch reads what
// its blocks write into their own rank's buffer (the waiter counts this rank's rows itself; the rows,
// counts and tails are read by later kernels, in stream order), so the flag orders nothing and waits
// for nothing. A relaxed store at GPU scope (only this rank's waiter reads it), whose value depends on
// the dispatch_seq load: it cannot be performed before that load.
__device__ __forceinline__ void eep2_raise_own(const Eep2Launch& launch, int me, u64 off_signal, u64 seq,
                                               int num_blocks) {
  if ((int)threadIdx.x != me) return;
  u64* flag = (u64*)(launch.peer + off_signal) + (u64)me * EEP_MAX_SIGNAL_BLOCKS + blockIdx.x;
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(flag), "l"(eep2_signal_value(seq, false, num_blocks))
               : "memory");
}

// This block's writes of step `seq` are done: after a block barrier, thread r raises the block's flag
// in the `off_signal` array of every other active rank r (R <= EEP_MAX_RANKS <= blockDim, so one
// thread per rank): a system-scope release store (the barrier puts every write of the block before
// it, and the release makes them visible to a receiver that acquires the flag; st.release.sys is a
// system-wide memory barrier, then the store). `dropped` (combine: the calling thread's rank was
// given up on at dispatch) sets the DROPPED bit — that rank's rows here were hidden, so it must add
// nothing from this rank.
__device__ __forceinline__ void eep2_raise(const u64* s_peer, int me, int R, const int* s_active, u64 off_signal,
                                           u64 seq, int num_blocks, bool dropped) {
  __syncthreads();
  const int r = threadIdx.x;
  if (r >= R || r == me || !eep_rank_active(s_active, r)) return;
  u64* flag = (u64*)(s_peer[r] + off_signal) + (u64)me * EEP_MAX_SIGNAL_BLOCKS + blockIdx.x;
  eep_st_release_sys(flag, eep2_signal_value(seq, dropped, num_blocks));
}

#define EEP2_FLAGS_PER_LANE (EEP_MAX_SIGNAL_BLOCKS / 32)  // a warp polls a source's 256 flags at once

// Flags f[0], f[32], ..., f[224]: eight strong (relaxed, system-scope) loads in one asm statement, so
// that they are issued back to back and wait together (one round trip, not eight).
__device__ __forceinline__ void eep2_load_flags(const u64* f, u64* v) {
  static_assert(EEP2_FLAGS_PER_LANE == 8, "eep2_load_flags reads eight flags");
  asm volatile(
      "ld.relaxed.sys.global.u64 %0, [%8];\n\t"
      "ld.relaxed.sys.global.u64 %1, [%8+256];\n\t"
      "ld.relaxed.sys.global.u64 %2, [%8+512];\n\t"
      "ld.relaxed.sys.global.u64 %3, [%8+768];\n\t"
      "ld.relaxed.sys.global.u64 %4, [%8+1024];\n\t"
      "ld.relaxed.sys.global.u64 %5, [%8+1280];\n\t"
      "ld.relaxed.sys.global.u64 %6, [%8+1536];\n\t"
      "ld.relaxed.sys.global.u64 %7, [%8+1792];"
      : "=l"(v[0]), "=l"(v[1]), "=l"(v[2]), "=l"(v[3]), "=l"(v[4]), "=l"(v[5]), "=l"(v[6]), "=l"(v[7])
      : "l"(f)
      : "memory");
}

// The waiter (one whole block): for every rank r with s_expect[r], wait until each of its sending
// blocks raised step `seq` in this rank's `off_signal` array, all against one deadline (now +
// timeout_ns). s_ok[r]: all arrived; s_dropped[r]: the sender marked this rank dropped. A rank that
// missed is recorded (miss_count, last_miss_seq, suspect: not waited for again). A warp per rank:
// lane l polls flags l, l + 32, ... together (strong relaxed loads at system scope, past L1);
// every flag of a launch carries the sender's grid size, so once any flag of the step is seen the
// flags past it are no longer polled. After the polls, one acquire fence in every warp that polled
// (the acquire pattern: strong reads that saw the release stores, then fence.acq_rel), then a block
// barrier: every thread of the block may read what other ranks' senders wrote before their flags.
__device__ void eep2_wait_senders(EepCtrl* ctrl, u64 my_base, int me, int R, const int* s_expect, u64 off_signal,
                                  u64 seq, u64 timeout_ns, int* s_ok, int* s_dropped) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  const u64 deadline = eep_globaltimer() + timeout_ns, step = eep2_signal_step(seq);
  const u64* flags = (const u64*)(my_base + off_signal);
  bool polled_peer = false;  // this warp polled another rank's flags
  for (int src = warp; src < R; src += num_warps) {
    bool ok = false, dropped = false;
    if (s_expect[src]) {
      polled_peer |= src != me;
      const u64* f = flags + (u64)src * EEP_MAX_SIGNAL_BLOCKS + lane;
      u32 pending = (1u << EEP2_FLAGS_PER_LANE) - 1;  // bit j: flag lane + 32 j not yet seen at this step
      int blocks = 0;                                 // the sender's grid (0: no flag of this step seen yet)
      while (true) {
        u64 v[EEP2_FLAGS_PER_LANE];
        eep2_load_flags(f, v);  // all eight, seen or not: they share one round trip
        int seen = 0;
#pragma unroll
        for (int j = 0; j < EEP2_FLAGS_PER_LANE; ++j) {
          if (((pending >> j) & 1u) && (v[j] >> 16) == step) {
            pending &= ~(1u << j);
            seen = (int)(v[j] & EEP_SIGNAL_BLOCKS_MASK);
            if (seen == 0) seen = EEP_MAX_SIGNAL_BLOCKS + 1;  // no v2 launch has an empty grid
            dropped |= (v[j] & EEP_SIGNAL_DROPPED) != 0;
          }
        }
        blocks = (int)__reduce_max_sync(0xffffffffu, (u32)max(blocks, seen));
        if (blocks > EEP_MAX_SIGNAL_BLOCKS) break;  // not a flag a v2 launch writes: a miss, no wait
        if (blocks > 0) {
#pragma unroll
          for (int j = 0; j < EEP2_FLAGS_PER_LANE; ++j)
            if (lane + 32 * j >= blocks) pending &= ~(1u << j);
        }
        if (__all_sync(0xffffffffu, pending == 0u)) {
          ok = blocks >= 1;
          break;
        }
        if (__any_sync(0xffffffffu, eep_globaltimer() > deadline)) break;
      }
      dropped = __any_sync(0xffffffffu, dropped);
      if (!ok && lane == 0) eep_record_miss(ctrl, src, seq);
    }
    if (lane == 0) {
      s_ok[src] = ok;
      s_dropped[src] = dropped;
    }
  }
  // the acquire of another rank's flags (this rank's own carry nothing to acquire); the barrier
  // passes it on to the block
  if (polled_peer) asm volatile("fence.acq_rel.sys;" ::: "memory");
  __syncthreads();
}

// The dispatch's waiting block: which sources' rows arrived (s_ok[r], also dispatch_ok[r]). This
// rank's own blocks are always waited for (their flags, raised at launch, say every block has read
// the step, so dispatch_seq may advance); another rank when active and not a suspect (`c`: the
// control block as read at launch).
__device__ __forceinline__ void eep2_dispatch_arrivals(EepCtrl* ctrl, const Eep2Ctrl& c, int me, int R,
                                                       const int* s_active, u64 my_base, u64 off_signal, u64 seq,
                                                       int* s_ok) {
  __shared__ int s_expect[EEP_MAX_RANKS], s_dropped[EEP_MAX_RANKS];
  const int r = threadIdx.x;
  if (r < R) s_expect[r] = eep_rank_active(s_active, r) && (r == me || !c.suspect);
  __syncthreads();
  eep2_wait_senders(ctrl, my_base, me, R, s_expect, off_signal, seq, c.timeout_ns, s_ok, s_dropped);
  if (r < R) ctrl->dispatch_ok[r] = (u64)s_ok[r];
}

// A reducing block's wait for the waiter's verdict: `*word` reaches `seq` (acquire). Bounded by
// twice the timeout plus 1 ms (the waiter itself waits at most one timeout); false if that passes.
__device__ __forceinline__ bool eep2_wait_verdict(const u64* word, u64 seq, u64 timeout_ns) {
  const u64 deadline = eep_globaltimer() + 2 * timeout_ns + 1000000ull;
  while (eep_ld_acquire_sys(word) != seq) {
    if (eep_globaltimer() > deadline) return false;
    __nanosleep(64);
  }
  return true;
}

// The combine waiter's verdict for the other reducing blocks, then its release: combine_ok[r] (the
// expert rank's rows arrived; this rank's own are read in place), combine_dropped (bit r: rank r
// hid this rank's tokens at dispatch), combine_seq, and combine_ready_seq = seq last (a release: it
// orders the peers' rows too, which the waiter acquired before, causality order being transitive);
// with no other rank active no block reads the verdict (`readers` false) and a plain store does.
__device__ __forceinline__ void eep2_publish_verdict(EepCtrl* ctrl, int me, int R, const int* s_ok,
                                                     const int* s_dropped, u64 seq, bool readers) {
  for (int r = threadIdx.x; r < R; r += blockDim.x) ctrl->combine_ok[r] = r == me ? 1ull : (u64)s_ok[r];
  __syncthreads();
  if (threadIdx.x == 0) {
    u64 dropped = 0;
    for (int r = 0; r < R; ++r) dropped |= (u64)(s_dropped[r] != 0) << r;
    ctrl->combine_dropped = dropped;
    *(volatile u64*)&ctrl->combine_seq = seq;
    if (readers) eep_st_release_sys(&ctrl->combine_ready_seq, seq);
    else *(volatile u64*)&ctrl->combine_ready_seq = seq;
  }
}

// A reducing block of a v2 combine, before it adds anything: which ranks' rows it adds (s_use[r]).
// The first reducing block (`is_waiter`) waits for every other active, unsuspected rank's pushing
// blocks (flags in this rank's `off_signal` array), records misses and publishes the verdict; the
// others acquire that verdict — only when another rank is active, so one rank never waits. A block
// adds its own rank's rows (read in place, if its dispatch kept them) and every other rank's whose
// rows arrived and that did not drop this rank; only its own when the verdict never came (bounded).
// `c`: the control block as read at launch (thread me holds this rank's dispatch_ok); `any_remote`:
// another rank is active (eep2_store_state).
__device__ __forceinline__ void eep2_rows_to_add(EepCtrl* ctrl, const Eep2Ctrl& c, int me, int R,
                                                 const int* s_active, bool any_remote, u64 my_base, u64 off_signal,
                                                 u64 seq, bool is_waiter, int* s_use) {
  __shared__ int s_expect[EEP_MAX_RANKS], s_ok[EEP_MAX_RANKS], s_dropped[EEP_MAX_RANKS];
  __shared__ int s_verdict;
  const int r = threadIdx.x;
  if (is_waiter) {
    if (r < R) s_expect[r] = r != me && eep_rank_active(s_active, r) && !c.suspect;
    __syncthreads();
    eep2_wait_senders(ctrl, my_base, me, R, s_expect, off_signal, seq, c.timeout_ns, s_ok, s_dropped);
    eep2_publish_verdict(ctrl, me, R, s_ok, s_dropped, seq, any_remote);
  } else {
    if (threadIdx.x == 0) s_verdict = any_remote && eep2_wait_verdict(&ctrl->combine_ready_seq, seq, c.timeout_ns);
    __syncthreads();
  }
  if (r < R) {
    const u64 dropped = !is_waiter && s_verdict ? *(const volatile u64*)&ctrl->combine_dropped : 0ull;
    int use;
    if (r == me) use = c.dispatch_ok != 0;
    else if (!eep_rank_active(s_active, r)) use = 0;
    else if (is_waiter) use = s_ok[r] && !s_dropped[r];
    else use = s_verdict && *(const volatile u64*)&ctrl->combine_ok[r] != 0 && !((dropped >> r) & 1ull);
    s_use[r] = use;
  }
  __syncthreads();
}
