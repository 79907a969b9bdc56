// MLA fast path (mla_decode_wgmma): split-KV attention over the paged latent cache with TMA and
// wgmma, for decode and chunked prefill alike. A CTA runs one 64-row head block over the
// (sequence, key block range)s of one part of the schedule (cuda/mla/schedule.cu); sequences
// split over several parts leave partial results for cuda/mla/combine.cu.
// Contract (buffers, tensor maps, grid, block, shared memory): cuda/params/mla.h.
//
// The kernel reads as its stages, each a device function below:
//   producer        warpgroup 0, one thread: TMA of Q and of the K/V pages into a 2-stage ring
//   qk              S = Q K^T (wgmma m64n32k16, per compute warpgroup 32 of the 64 keys)
//   softmax_max     scale, causal/length mask, row maxima exchanged between the warpgroups
//   zero_stale_v    V rows past the sequence cleared, so stale cache bytes cannot reach O
//   softmax_probs   P = exp2(S - m) to shared memory, row sums, O rescaled
//   pv              O += P V (wgmma m64n256k16, per compute warpgroup 256 of the 512 features)
//   epilogue        row sums across the warpgroups, O / l and the LSE to out or the partials
//
// Shared memory (from the 1024-byte aligned dynamic base; every tile in 128-byte swizzle atoms of
// 8 rows x 128 bytes, as TMA writes them with CU_TENSOR_MAP_SWIZZLE_128B):
//   sQ       9 column blocks x (64 rows x 128 bytes): Q rows [c_kv latent 512 | rope 64]
//   sK[2]    the same for a 64-token cache page (two stages)
//   sP       64 rows x 64 keys bf16 (one column block): softmax numerators
//   stats    row maxima [2][64] and row sums [2][64] (f32) exchanged between warpgroups
//   bars     q_full, q_empty, k_full[2], k_empty[2]
// Warpgroup 0 = producer (thread 0 issues every TMA; registers lowered to
// R1_REALLOC_PRODUCER_REGS), warpgroups 1 and 2 = compute warpgroups c = 0 and 1 (registers
// raised to R1_REALLOC_CONSUMER_REGS).
//
// Operands of the tensor cores:
//   S = Q K^T   A = sQ   K-major (K = feature), B = sK K-major: wgmma m64n32k16, 36 steps of
//               16 features; warpgroup c takes keys [32c, 32c + 32) (B start + 32c rows).
//   O += P V    A = sP   K-major (K = key), B = sK's c_kv columns read N-major (N = feature,
//               consecutive within a 128-byte row): wgmma m64n256k16 with imm-trans-b = 1,
//               4 steps of 16 keys; warpgroup c takes features [256c, 256c + 256).
//   Descriptors (PTX ISA "matrix descriptor"): 128-byte swizzle; K-major: SBO = 1024 (next
//   8 rows), LBO unused; N-major: LBO = 8192 (next 64 features = next column block),
//   SBO = 1024 (next 8 keys). A K step of 16 bf16 inside a 128-byte row adds 32 bytes.
#include <cuda_bf16.h>
#include <stdint.h>

#include "params/mla.h"
#include "mla/common.cuh"
#include "ptx.cuh"

using namespace r1::mla;

namespace {

constexpr int BM = R1_MLA_BLOCK_M;            // rows (query token, head) per CTA
constexpr int BN = PAGE;                      // keys per tile = one page
constexpr int WIDTH = R1_MLA_KV_LORA + R1_MLA_ROPE;  // 576
constexpr int ROW_BYTES = WIDTH * 2;          // 1152
constexpr int CBLKS = WIDTH / 64;             // 9 column blocks of 64 bf16 = 128 bytes
constexpr int CB_BYTES = 64 * 128;            // one column block of a 64-row tile
constexpr int TILE_BYTES = CBLKS * CB_BYTES;  // 73728
constexpr int STAGES = 2;
constexpr int OFF_Q = 0;
constexpr int OFF_K = OFF_Q + TILE_BYTES;
constexpr int OFF_P = OFF_K + STAGES * TILE_BYTES;
constexpr int OFF_STATS = OFF_P + 64 * 128;
constexpr int OFF_BARS = OFF_STATS + 4 * 64 * 4;
constexpr int SMEM_BYTES = OFF_BARS + 64;
static_assert(SMEM_BYTES == R1_MLA_DECODE_SMEM_BYTES, "params/mla.h R1_MLA_DECODE_SMEM_BYTES");
static_assert(R1_MLA_DECODE_THREADS == 3 * 128, "one producer warpgroup + two compute warpgroups");
static_assert(WIDTH % 64 == 0 && KV == 512 && BM == 64 && BN == 64, "tile shapes");
static_assert(ROW_BYTES == 1152, "tensor-map rows (params/mla.h)");
constexpr int K_STEPS_QK = WIDTH / 16;  // 36
constexpr int K_STEPS_PV = BN / 16;     // 4
constexpr uint32_t CONSUMER_WARPS = 8;
constexpr uint32_t NAMED_BAR = 1;       // bar.sync id for the 256 compute threads

__device__ __forceinline__ void compute_bar() { r1::named_bar_sync<NAMED_BAR, 256>(); }

__device__ __forceinline__ uint64_t desc_k_major(uint32_t addr) { return r1::smem_desc_k_sw128(addr); }
__device__ __forceinline__ uint64_t desc_n_major(uint32_t addr) { return r1::smem_desc_sw128(addr, CB_BYTES, 1024); }

// ============================================================================================
// Schedule: parts and segments
// ============================================================================================

// One (sequence, block range) of a part, as both roles see it.
struct Seg {
    bool active;  // this part has blocks of b and this head block has rows in b
    int blk0;     // first key block
    int ntiles;   // key blocks to run (after the causal limit of this head block; may be 0)
    int q_start;
    int q_len;
    int kv_len;
    int rows;     // valid rows of this head block (1..64)
    int split;    // partial-result slot (when nsplit > 1)
    int nsplit;
};

struct Part {
    int begin_b, begin_blk, end_b, end_blk, begin_split;
};

__device__ __forceinline__ Seg make_seg(const R1MlaDecodeParams& p, const Part& part, int b, int hb) {
    Seg s;
    s.active = false;
    const SeqInfo si = seq_info(reinterpret_cast<const int*>(p.q_starts), reinterpret_cast<const int*>(p.seqlens_k),
                                b, p.total_q, p.max_q_len, p.bt_stride);
    const int nblk = (si.kv_len + BN - 1) / BN;
    const int blk0 = b == part.begin_b ? part.begin_blk : 0;
    const int blk1 = min(b == part.end_b ? part.end_blk : nblk, nblk);
    const int rows_b = si.q_len * p.heads;
    const int row0 = hb * BM;
    if (blk0 >= blk1 || row0 >= rows_b) return s;
    s.active = true;
    s.q_start = si.q_start;
    s.q_len = si.q_len;
    s.kv_len = si.kv_len;
    s.rows = min(BM, rows_b - row0);
    // Causal: the last query token of this head block sees keys [0, kv_len - q_len + i_max].
    const int i_max = min(si.q_len - 1, (row0 + BM - 1) / p.heads);
    const int kv_lim = si.kv_len - si.q_len + i_max + 1;
    const int blk_lim = kv_lim > 0 ? (kv_lim + BN - 1) / BN : 0;
    s.blk0 = blk0;
    s.ntiles = max(0, min(blk1, blk_lim) - blk0);
    const int* splits = reinterpret_cast<const int*>(p.splits);
    const int first = splits[b];
    s.nsplit = splits[b + 1] - first;
    s.split = first + (b == part.begin_b ? part.begin_split : 0);
    // A sequence with several splits writes partial-result slot s.split: it must lie inside
    // the sequence's own slots and the workspace (a corrupt schedule writes nothing).
    if (s.nsplit > 1 && !(first >= 0 && s.split >= first && s.split < first + s.nsplit &&
                          first + s.nsplit <= p.slots))
        s.active = false;
    return s;
}

// Part `part` of the schedule, its sequence range clamped to the batch (device data are
// never trusted: a corrupt schedule may compute garbage but never reads or writes outside).
__device__ __forceinline__ Part read_part(const R1MlaDecodeParams& p, int part) {
    const int* f = reinterpret_cast<const int*>(p.sched) + static_cast<int64_t>(part) * R1_MLA_SCHED_FIELDS;
    return Part{max(f[0], 0), max(f[1], 0), min(f[2], p.batch - 1), f[3], max(f[4], 0)};
}

// ============================================================================================
// Shared memory and the K ring
// ============================================================================================

// The CTA's shared memory: shared-space addresses for TMA, wgmma and the mbarriers, generic
// pointers for the threads' own loads and stores.
struct Smem {
    uint8_t* raw;          // the dynamic base
    uint32_t q, k, p;      // sQ, sK[0], sP
    float* max;            // [2][64] row maxima, one row of 64 per compute warpgroup
    float* sum;            // [2][64] row sums
    uint32_t bar_q_full;
    uint32_t bar_q_empty;
    uint32_t bar_k_full;   // + 8 * stage
    uint32_t bar_k_empty;  // + 8 * stage
};

__device__ __forceinline__ Smem carve_smem(uint8_t* smem_raw) {
    Smem sm;
    const uint32_t base = r1::aligned_dynamic_smem(smem_raw);
    sm.raw = smem_raw;
    sm.q = base + OFF_Q;
    sm.k = base + OFF_K;
    sm.p = base + OFF_P;
    sm.max = reinterpret_cast<float*>(smem_raw + OFF_STATS);
    sm.sum = sm.max + 2 * 64;
    sm.bar_q_full = base + OFF_BARS;
    sm.bar_q_empty = sm.bar_q_full + 8;
    sm.bar_k_full = sm.bar_q_full + 16;
    sm.bar_k_empty = sm.bar_q_full + 32;
    return sm;
}

__device__ __forceinline__ void init_barriers(const Smem& sm) {
    r1::mbar_init(sm.bar_q_full, 1);
    r1::mbar_init(sm.bar_q_empty, CONSUMER_WARPS);
    for (int s = 0; s < STAGES; s++) {
        r1::mbar_init(sm.bar_k_full + 8 * s, 1);
        r1::mbar_init(sm.bar_k_empty + 8 * s, CONSUMER_WARPS);
    }
    r1::fence_mbar_init();
    r1::fence_proxy_async_smem();
}

// A role's position in the K ring and the barrier phases it waits on; the producer and the
// consumers walk the same tiles, so their rings stay in step.
struct Ring {
    int stage;
    uint32_t kphase;
    uint32_t qphase;

    __device__ __forceinline__ void next_k() {
        if (++stage == STAGES) {
            stage = 0;
            kphase ^= 1;
        }
    }
};

// ============================================================================================
// Producer (warpgroup 0)
// ============================================================================================

// Key tile t of segment s (one 64-token page) into the next K stage, once the consumers freed it.
__device__ __forceinline__ void load_k_tile(const R1MlaDecodeParams& p, const Smem& sm, const int* table,
                                            const Seg& s, int t, Ring& ring) {
    const int page = table[s.blk0 + t];
    // An invalid page id becomes the first row past the cache: TMA fills zeros.
    const int row = (page >= 0 && page < p.num_pages) ? page * PAGE : p.num_pages * PAGE;
    r1::mbar_wait(sm.bar_k_empty + 8 * ring.stage, ring.kphase ^ 1);
    const uint32_t full = sm.bar_k_full + 8 * ring.stage;
    r1::mbar_arrive_expect_tx(full, TILE_BYTES);
    const uint32_t dst = sm.k + ring.stage * TILE_BYTES;
#pragma unroll
    for (int cb = 0; cb < CBLKS; cb++) r1::tma_load_2d(dst + cb * CB_BYTES, &p.tmap_cache, full, cb * 128, row);
    ring.next_k();
}

// The head block's 64 query rows of segment s into sQ, once the consumers are done with the last.
__device__ __forceinline__ void load_q_tile(const R1MlaDecodeParams& p, const Smem& sm, const Seg& s, int hb,
                                            Ring& ring) {
    r1::mbar_wait(sm.bar_q_empty, ring.qphase ^ 1);
    r1::mbar_arrive_expect_tx(sm.bar_q_full, TILE_BYTES);
    const int qrow = s.q_start * p.heads + hb * BM;
#pragma unroll
    for (int cb = 0; cb < CBLKS; cb++) r1::tma_load_2d(sm.q + cb * CB_BYTES, &p.tmap_q, sm.bar_q_full, cb * 128, qrow);
    ring.qphase ^= 1;
}

// Warpgroup 0 hands its registers to the consumers; its thread 0 issues every TMA of the part.
__device__ __forceinline__ void producer(const R1MlaDecodeParams& p, const Smem& sm, const Part& part, int hb) {
    r1::setmaxnreg_dec<R1_REALLOC_PRODUCER_REGS>();
    if (threadIdx.x != 0) return;
    r1::tma_prefetch_desc(&p.tmap_q);
    r1::tma_prefetch_desc(&p.tmap_cache);
    Ring ring{0, 0, 0};
    for (int b = part.begin_b; b <= part.end_b; b++) {
        const Seg s = make_seg(p, part, b, hb);
        if (!s.active || s.ntiles == 0) continue;
        const int* table = reinterpret_cast<const int*>(p.block_table) + static_cast<int64_t>(b) * p.bt_stride;
        // The first page goes out before Q so that it overlaps the previous sequence's tail.
        load_k_tile(p, sm, table, s, 0, ring);
        load_q_tile(p, sm, s, hb, ring);
        for (int t = 1; t < s.ntiles; t++) load_k_tile(p, sm, table, s, t, ring);
    }
}

// ============================================================================================
// Consumers (warpgroups 1 and 2)
// ============================================================================================

// A compute thread's place in the tile (wgmma register layout, ptx.cuh).
struct Thread {
    int c;     // compute warpgroup: keys [32c, 32c + 32) of S, features [256c, 256c + 256) of O
    int r0;    // this thread's rows: r0 and r0 + 8
    int quad;  // lane % 4
};

// ---- S = Q K^T for keys [32c, 32c + 32) of the tile
__device__ __forceinline__ void qk(const Smem& sm, uint32_t sk, const Thread& th, float (&sc)[16]) {
#pragma unroll
    for (int j = 0; j < 16; j++) {
        sc[j] = 0.0f;
        r1::fence_reg(sc[j]);
    }
    r1::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < K_STEPS_QK; ks++) {
        const uint32_t koff = (ks / 4) * CB_BYTES + (ks % 4) * 32;
        r1::wgmma_m64n32k16_bf16(sc, desc_k_major(sm.q + koff), desc_k_major(sk + koff + th.c * 32 * 128), ks > 0);
    }
    r1::wgmma_commit();
    r1::wgmma_wait<0>();
#pragma unroll
    for (int j = 0; j < 16; j++) r1::fence_reg(sc[j]);
}

// ---- scale (log2 domain), causal / length mask, row maxima; the new running maxima m, the
// factor alpha that rescales the old O and l, and the maxima P subtracts (0 while a row has
// seen no key).
__device__ __forceinline__ void softmax_max(const R1MlaDecodeParams& p, const Smem& sm, const Thread& th, int blk,
                                            const int (&lim)[2], float (&sc)[16], float (&m)[2],
                                            float (&alpha)[2], float (&m_use)[2]) {
    const int key0 = blk * BN + 32 * th.c + 2 * th.quad;
    float mx[2] = {neg_inf(), neg_inf()};
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const int i = (j / 2) % 2;
        const int key = key0 + 8 * (j / 4) + (j % 2);
        sc[j] = key <= lim[i] ? sc[j] * p.scale_log2 : neg_inf();
        mx[i] = fmaxf(mx[i], sc[j]);
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    }
    if (th.quad == 0) {
        sm.max[th.c * 64 + th.r0] = mx[0];
        sm.max[th.c * 64 + th.r0 + 8] = mx[1];
    }
    compute_bar();  // both halves' maxima written; both warpgroups' S reads of sK done

#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int rr = th.r0 + 8 * i;
        const float m_new = fmaxf(m[i], fmaxf(sm.max[rr], sm.max[64 + rr]));
        alpha[i] = m_new == neg_inf() ? 1.0f : exp2f(m[i] - m_new);
        m_use[i] = m_new == neg_inf() ? 0.0f : m_new;
        m[i] = m_new;
    }
}

// ---- keys past the sequence: zero their V rows (this warpgroup's features) so that stale
// cache contents (even NaN) cannot reach O through P = 0.
__device__ __forceinline__ void zero_stale_v(const Smem& sm, const Thread& th, int stage, int kv_len, int blk) {
    const int nvalid = kv_len - blk * BN;
    if (nvalid < BN) {
        const int tid = threadIdx.x % 128;
        const int nzero = BN - nvalid;
        uint8_t* tile = sm.raw + OFF_K + stage * TILE_BYTES;
        for (int idx = tid; idx < 4 * nzero * 8; idx += 128) {
            const int cb = 4 * th.c + idx / (nzero * 8);
            const int rem = idx % (nzero * 8);
            const int key = nvalid + rem / 8;
            *reinterpret_cast<uint4*>(tile + cb * CB_BYTES + key * 128 + (rem % 8) * 16) = make_uint4(0u, 0u, 0u, 0u);
        }
    }
}

// ---- P = exp2(S - m) -> bf16 into sP (128-byte swizzle), row sums into l, O rescaled by alpha
__device__ __forceinline__ void softmax_probs(const Smem& sm, const Thread& th, const float (&sc)[16],
                                              const float (&alpha)[2], const float (&m_use)[2], float (&l)[2],
                                              float (&o)[128]) {
    float rs[2] = {0.0f, 0.0f};
    uint8_t* sp = sm.raw + OFF_P;
#pragma unroll
    for (int j = 0; j < 16; j += 2) {
        const int i = (j / 2) % 2;
        const float p0 = exp2f(sc[j] - m_use[i]);
        const float p1 = exp2f(sc[j + 1] - m_use[i]);
        rs[i] += p0 + p1;
        const int row = th.r0 + 8 * i;
        const int key = 32 * th.c + 8 * (j / 4) + 2 * th.quad;
        *reinterpret_cast<__nv_bfloat162*>(sp + row * 128 + (((key >> 3) ^ (row & 7)) << 4) + (key & 7) * 2) =
            __floats2bfloat162_rn(p0, p1);
    }
#pragma unroll
    for (int i = 0; i < 2; i++) l[i] = fmaf(l[i], alpha[i], rs[i]);
#pragma unroll
    for (int j = 0; j < 128; j++) o[j] *= alpha[(j / 2) % 2];
    r1::fence_proxy_async_smem();  // sP (and zeroed V rows) visible to the tensor cores
    compute_bar();                 // both halves of P written
}

// ---- O[:, 256c .. 256c + 256) += P V
__device__ __forceinline__ void pv(const Smem& sm, uint32_t sk, const Thread& th, float (&o)[128]) {
#pragma unroll
    for (int j = 0; j < 128; j++) r1::fence_reg(o[j]);
    r1::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < K_STEPS_PV; ks++) {
        r1::wgmma_m64n256k16_bf16_bt(o, desc_k_major(sm.p + ks * 32),
                                     desc_n_major(sk + 4 * th.c * CB_BYTES + ks * 16 * 128), 1);
    }
    r1::wgmma_commit();
    r1::wgmma_wait<0>();
#pragma unroll
    for (int j = 0; j < 128; j++) r1::fence_reg(o[j]);
}

// ---- epilogue: total row sums across the quad and the two warpgroups, then O / l (bf16) and
// the LSE to out / lse, or, for a sequence split over several parts, the normalized partial O
// and its log2-domain LSE to slot s.split of o_accum / lse_accum.
__device__ __forceinline__ void epilogue(const R1MlaDecodeParams& p, const Smem& sm, const Thread& th, const Seg& s,
                                         int hb, int rows_cap, const float (&m)[2], float (&l)[2],
                                         const float (&o)[128]) {
    const int c = th.c;
    const int r0 = th.r0;
    const int quad = th.quad;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
    if (quad == 0) {
        sm.sum[c * 64 + r0] = l[0];
        sm.sum[c * 64 + r0 + 8] = l[1];
    }
    compute_bar();
    float inv[2], lse2[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int rr = r0 + 8 * i;
        const float total = sm.sum[rr] + sm.sum[64 + rr];
        inv[i] = total > 0.0f ? 1.0f / total : 0.0f;
        lse2[i] = total > 0.0f ? m[i] + log2f(total) : neg_inf();
    }
    compute_bar();  // sum reads done before the next sequence writes them

    const int local0 = hb * BM;  // row of this head block within the sequence's rows
    if (s.nsplit <= 1) {
        __nv_bfloat16* out = reinterpret_cast<__nv_bfloat16*>(p.out);
        float* lse = reinterpret_cast<float*>(p.lse);
        const int64_t grow0 = static_cast<int64_t>(s.q_start) * p.heads + local0;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int row = r0 + 8 * i;
            if (row >= s.rows) continue;
            __nv_bfloat16* dst = out + (grow0 + row) * KV + 256 * c + 2 * quad;
#pragma unroll
            for (int n = 0; n < 32; n++) {
                const int j = 4 * n + 2 * i;
                *reinterpret_cast<__nv_bfloat162*>(dst + 8 * n) =
                    __floats2bfloat162_rn(o[j] * inv[i], o[j + 1] * inv[i]);
            }
            if (c == 0 && quad == 0) lse[grow0 + row] = lse2[i] * LN2;
        }
    } else {
        float* oacc = reinterpret_cast<float*>(p.o_accum);
        float* lacc = reinterpret_cast<float*>(p.lse_accum);
        const int64_t srow0 = static_cast<int64_t>(s.split) * rows_cap + local0;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int row = r0 + 8 * i;
            if (row >= s.rows) continue;
            float* dst = oacc + (srow0 + row) * KV + 256 * c + 2 * quad;
#pragma unroll
            for (int n = 0; n < 32; n++) {
                const int j = 4 * n + 2 * i;
                *reinterpret_cast<float2*>(dst + 8 * n) = make_float2(o[j] * inv[i], o[j + 1] * inv[i]);
            }
            if (c == 0 && quad == 0) lacc[srow0 + row] = lse2[i];
        }
    }
}

// Warpgroups 1 and 2 take the producer's registers and run every segment of the part: per key
// tile QK^T, softmax, PV; per segment the epilogue.
__device__ __forceinline__ void consumer(const R1MlaDecodeParams& p, const Smem& sm, const Part& part, int hb,
                                         int warp_idx, int lane) {
    r1::setmaxnreg_inc<R1_REALLOC_CONSUMER_REGS>();
    const int w = warp_idx % 4;
    const Thread th{warp_idx / 4 - 1, 16 * w + lane / 4, lane % 4};
    const int rows_cap = p.max_q_len * p.heads;
    Ring ring{0, 0, 0};

    for (int b = part.begin_b; b <= part.end_b; b++) {
        const Seg s = make_seg(p, part, b, hb);
        if (!s.active) continue;

        // Last visible key of rows r0 and r0 + 8 (padding rows reuse the last query token).
        int lim[2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int qi = min((hb * BM + th.r0 + 8 * i) / p.heads, s.q_len - 1);
            lim[i] = s.kv_len - s.q_len + qi;
        }

        float o[128];
#pragma unroll
        for (int j = 0; j < 128; j++) o[j] = 0.0f;
        float m[2] = {neg_inf(), neg_inf()};
        float l[2] = {0.0f, 0.0f};

        if (s.ntiles > 0) {
            r1::mbar_wait(sm.bar_q_full, ring.qphase);
            ring.qphase ^= 1;
            for (int t = 0; t < s.ntiles; t++) {
                const int blk = s.blk0 + t;
                const uint32_t sk = sm.k + ring.stage * TILE_BYTES;
                r1::mbar_wait(sm.bar_k_full + 8 * ring.stage, ring.kphase);

                float sc[16];
                qk(sm, sk, th, sc);
                float alpha[2], m_use[2];
                softmax_max(p, sm, th, blk, lim, sc, m, alpha, m_use);
                zero_stale_v(sm, th, ring.stage, s.kv_len, blk);
                softmax_probs(sm, th, sc, alpha, m_use, l, o);
                pv(sm, sk, th, o);

                __syncwarp();
                if (lane == 0) r1::mbar_arrive(sm.bar_k_empty + 8 * ring.stage);
                ring.next_k();
            }
            __syncwarp();
            if (lane == 0) r1::mbar_arrive(sm.bar_q_empty);
        }

        epilogue(p, sm, th, s, hb, rows_cap, m, l, o);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(R1_MLA_DECODE_THREADS, 1)
mla_decode_wgmma(const __grid_constant__ R1MlaDecodeParams p) {
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    const Smem sm = carve_smem(smem_raw);
    const int hb = blockIdx.x;
    const Part part = read_part(p, blockIdx.y);
    const int warp_idx = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;

    if (threadIdx.x == 0) init_barriers(sm);
    __syncthreads();

    if (warp_idx < 4) {
        producer(p, sm, part, hb);
        return;
    }
    consumer(p, sm, part, hb, warp_idx, lane);
}
