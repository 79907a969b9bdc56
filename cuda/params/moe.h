/* MoE routed experts (cuda/moe.cu, cuda/moe_gemm.cu). */
#ifndef R1_PARAMS_MOE_H
#define R1_PARAMS_MOE_H

#include <stdint.h>

#include "common.h"

/* MOE SECTION (cuda/moe.cu, cuda/moe_gemm.cu) ============================================
 *
 * Routed experts of a DeepSeek-V3 MoE layer for a batch of T tokens, E experts, top-k = K:
 *   moe_router_logits  bf16 x [T, H] . bf16 Wg [E, H]^T -> f32 logits [T, E]
 *   moe_router         logits (+ bias) -> topk_ids i32 [T, K], topk_weights f32 [T, K]
 *   act_quant          x -> fp8 xq [T, H] + SA scales            (cuda/act_quant.cu)
 *   moe_plan           topk_ids -> per-expert counts, each entry's destination row, and the
 *                      contiguous layout's block tables (one CTA; no host synchronization)
 *   moe_gather         xq rows (+ scales) -> expert-ordered rows (contiguous or masked)
 *   moe_gemm_*         grouped FP8 GEMM gate+up: [rows, H] x [E][2I, H]^T -> bf16 [rows, 2I]
 *   moe_silu_quant     bf16 [gate | up] -> fp8 of bf16(silu(gate) * up) [rows, I] + SA scales
 *   moe_gemm_*         grouped FP8 GEMM down: [rows, I] x [E][H, I]^T -> bf16 [rows, H]
 *   moe_unpermute      out[t] = bf16(bf16(sum_k w[t,k] * y[row(t,k)]) + shared[t])
 *
 * Entries: entry i = t * K + k is token t's k-th routed choice (topk_ids[i], topk_weights[i]);
 * dest_row[i] is the row it occupies in the permuted ("flat") buffers, -1 when it occupies
 * none (a token whose router input had a NaN, an invalid id, a masked-layout overflow).
 *
 * Flat rows. Both layouts are one row-major matrix of R rows ("flat rows") with SA-layout
 * scales over them (sa[kb * r_pad + row], r_pad = R rounded up to 4):
 *   contiguous (prefill): experts in ascending order, each expert's rows (its entries in
 *     ascending entry order) padded to R1_MOE_BLOCK_M rows. Block b (rows [128b, 128b+128))
 *     belongs to expert block_expert[b] and holds block_rows[b] valid rows (at its start);
 *     *num_blocks blocks are in use. R = max_blocks * 128 with
 *     max_blocks = ceil(T*K / 128) + min(E, T*K) (enough for any routing).
 *     Padding rows are never written (not by moe_gather, not by the GEMMs' epilogues, not by
 *     moe_silu_quant) and never read into valid rows.
 *   masked (decode): expert e owns rows [e * M, e * M + M), M = max_tokens_per_expert; its
 *     first counts[e] rows are valid (ascending entry order). R = E * M. Entries past M are
 *     dropped (dest_row -1, flag R1_MOE_FLAG_OVERFLOW); M = T never overflows.
 *
 * Stacked expert weights ("grouped weight"): fp8 codes [E][N][K] (row-major, K-major rows,
 * ldb = K) and multipliers [E][ceil(N/128)][ceil(K/128)]. Gate and up are stacked as one
 * weight of N = 2I per expert: rows [0, I) gate, [I, 2I) up (I % 128 == 0 keeps the 128x128
 * scale blocks intact).
 *
 * Error flags: u32 flags[R1_MOE_FLAGS_LEN], zeroed by the host, set (sticky) by the kernels:
 *   [0] OR of R1_MOE_FLAG_* bits   [1] tokens with NaN router input
 *   [2] 0xFFFFFFFF - lowest such token (0: none)   [3] dropped entries (masked overflow)
 *   [4] entries with an id outside [-1, E)
 * A NaN-flagged token gets topk_ids -1 and weight 0 (its routed output is 0); the host turns
 * any set bit into an error when it reads the flags (after the step; no sync inside).
 * ------------------------------------------------------------------------------------- */
#define R1_MOE_MAX_EXPERTS 512
#define R1_MOE_MAX_TOP_K 32
#define R1_MOE_BLOCK_M 128
#define R1_MOE_FLAGS_LEN 8
#define R1_MOE_FLAG_NAN 1u
#define R1_MOE_FLAG_OVERFLOW 2u
#define R1_MOE_FLAG_BAD_ID 4u
#define R1_MOE_LAYOUT_CONTIGUOUS 0
#define R1_MOE_LAYOUT_MASKED 1

/* ---------------------------------------------------------------------------------------
 * moe_router_logits (cuda/moe.cu): logits[t][e] = dot(x[t], Wg[e]) in f32, in EXACTLY the
 * order of numerics::dot (8 running sums acc[l] += x[8i+l] * w[8i+l], product and sum each
 * rounded, i ascending, then ((acc0 + acc1) + ...) + acc7): bit-identical to the CPU router
 * logits. CUDA cores (the exact-order kernel; not a tensor-core GEMM).
 *   CTA (bx, by): experts [EXPERTS bx, EXPERTS bx + EXPERTS) x tokens [TOKENS by, + TOKENS);
 *   thread tid owns partial sum tid % 8 of expert tid / 8 % EXPERTS for the tile's tokens
 *   tid / (8 EXPERTS) + k * THREADS / (8 EXPERTS). The CTA's expert rows and token rows are
 *   staged in shared memory `chunk` channels at a time (cp.async, two stages), each row
 *   `ld_smem` elements apart: stage = (EXPERTS + tile) * ld_smem bf16, tile = min(TOKENS, T).
 *   block: (R1_MOE_LOGITS_THREADS, 1, 1)
 *   dynamic smem: min(2, ceil(H / chunk)) * stage * 2 bytes (<= R1_MOE_LOGITS_SMEM_BYTES)
 *   grid:  (ceil(E / R1_MOE_LOGITS_EXPERTS), ceil(T / R1_MOE_LOGITS_TOKENS), 1)
 *   Requires: H % 8 == 0, ldx % 8 == 0, x and w 16-byte aligned; chunk % 8 == 0, chunk >= 8,
 *             ld_smem % 8 == 0, ld_smem >= min(chunk, H).
 * ------------------------------------------------------------------------------------- */
#define R1_MOE_LOGITS_THREADS 256
#define R1_MOE_LOGITS_EXPERTS 2
#define R1_MOE_LOGITS_TOKENS 64
#define R1_MOE_LOGITS_SMEM_BYTES 204800 /* 200 KiB (a literal so bindgen exports it) */

typedef struct R1MoeRouterLogitsParams {
    unsigned long long x;      /* bf16 [tokens][ldx]                          */
    unsigned long long w;      /* bf16 [experts][hidden] (mlp.gate.weight)    */
    unsigned long long logits; /* out: f32 [tokens][experts]                  */
    int32_t tokens;
    int32_t experts;
    int32_t hidden;
    int32_t ldx;
    int32_t chunk;             /* channels staged per step (multiple of 8)    */
    int32_t ld_smem;           /* staged row stride in elements (multiple of 8) */
} R1MoeRouterLogitsParams;

/* ---------------------------------------------------------------------------------------
 * moe_router (cuda/moe.cu): noaux_tc routing, the decisions of cpu::moe::Router::route:
 *   s = sigmoid(logit) = 1 / (1 + e), e = (float)exp(-(double)logit) (f32 division/addition);
 *   c = s + bias; group score = sum of the group's two best c (one if the group has one);
 *   keep topk_group groups; top_k experts by c among them (others count as -inf);
 *   w = s / (sum of chosen s, in chosen order, + 1e-20) * scaling (normalize) or s * scaling.
 *   Every comparison is IEEE total order with ties to the LOWER index (Rust's total_cmp +
 *   index). Outputs in choice order (best first), like Router::route.
 *   A NaN logit or NaN c in a token: flags (see above), ids -1, weights 0 for that token.
 *   block: (32 * R1_MOE_ROUTER_WARPS, 1, 1), one warp per token
 *   grid:  (ceil(T / R1_MOE_ROUTER_WARPS), 1, 1)
 *   dynamic smem: R1_MOE_ROUTER_WARPS * (2 * E + 2 * n_group) * 4 bytes (must be <= 48 KiB)
 *   Requires: 1 <= E <= R1_MOE_MAX_EXPERTS, E % n_group == 0, 1 <= topk_group <= n_group,
 *             1 <= top_k <= min(E, R1_MOE_MAX_TOP_K).
 * ------------------------------------------------------------------------------------- */
#define R1_MOE_ROUTER_WARPS 4

typedef struct R1MoeRouterParams {
    unsigned long long logits;       /* f32 [tokens][experts]                          */
    unsigned long long bias;         /* f32 [experts] e_score_correction_bias; 0: none */
    unsigned long long topk_ids;     /* out: i32 [tokens][top_k]                       */
    unsigned long long topk_weights; /* out: f32 [tokens][top_k]                       */
    unsigned long long flags;        /* u32 [R1_MOE_FLAGS_LEN]                         */
    int32_t tokens;
    int32_t experts;
    int32_t n_group;
    int32_t topk_group;
    int32_t top_k;
    int32_t normalize;               /* norm_topk_prob (0 or 1)                        */
    float scaling;                   /* routed_scaling_factor                          */
    int32_t reserved;                /* set to 0 */
} R1MoeRouterParams;

/* ---------------------------------------------------------------------------------------
 * moe_plan (cuda/moe.cu): ONE CTA of R1_MOE_PLAN_THREADS threads.
 *   counts[e]  = entries routed to e (masked: min(count, M));
 *   dest_row[i] as described above (deterministic: ascending entry order within an expert);
 *   contiguous: block_expert[b], block_rows[b] for b < *num_blocks, (-1, 0) for the other
 *   blocks < max_blocks; *num_blocks. (Unused in the masked layout: may be 0.)
 *   dynamic smem: R1_MOE_PLAN_SMEM_PER_EXPERT * E + 128 bytes
 *   Requires: 1 <= E <= R1_MOE_MAX_EXPERTS, 1 <= top_k, T * top_k < 2^31;
 *             contiguous: max_blocks >= 1; masked: max_tokens_per_expert >= 1.
 * ------------------------------------------------------------------------------------- */
#define R1_MOE_PLAN_THREADS 1024
#define R1_MOE_PLAN_SMEM_PER_EXPERT 76

typedef struct R1MoePlanParams {
    unsigned long long topk_ids;     /* i32 [tokens * top_k]                  */
    unsigned long long dest_row;     /* out: i32 [tokens * top_k]             */
    unsigned long long counts;       /* out: i32 [experts]                    */
    unsigned long long block_expert; /* out: i32 [max_blocks] (contiguous)    */
    unsigned long long block_rows;   /* out: i32 [max_blocks] (contiguous)    */
    unsigned long long num_blocks;   /* out: i32 [1] (contiguous)             */
    unsigned long long flags;        /* u32 [R1_MOE_FLAGS_LEN]                */
    int32_t tokens;
    int32_t top_k;
    int32_t experts;
    int32_t layout;                  /* R1_MOE_LAYOUT_*                       */
    int32_t max_blocks;              /* contiguous                            */
    int32_t max_tokens_per_expert;   /* masked (M)                            */
} R1MoePlanParams;

/* ---------------------------------------------------------------------------------------
 * moe_gather (cuda/moe.cu): for each entry i with dest_row[i] = r >= 0 (token t = i / top_k):
 *   aq[r][0..k) = xq[t][0..k), a_scales[kb * as_m_pad + r] = xs[kb * xs_m_pad + t].
 *   block: (R1_MOE_GATHER_THREADS, 1, 1), one warp per entry; dynamic smem: 0
 *   grid:  (ceil(entries / (R1_MOE_GATHER_THREADS / 32)), 1, 1)
 *   Requires: k % 128 == 0; ldxq, lda % 16 == 0; xq, aq 16-byte aligned.
 * ------------------------------------------------------------------------------------- */
#define R1_MOE_GATHER_THREADS 256

typedef struct R1MoeGatherParams {
    unsigned long long xq;       /* fp8 [tokens][ldxq]                  */
    unsigned long long xs;       /* f32 SA [k/128][xs_m_pad]            */
    unsigned long long dest_row; /* i32 [entries]                       */
    unsigned long long aq;       /* out: fp8 [R][lda] (flat rows)       */
    unsigned long long a_scales; /* out: f32 SA [k/128][as_m_pad]       */
    int32_t entries;
    int32_t top_k;
    int32_t k;
    int32_t ldxq;
    int32_t lda;
    int32_t xs_m_pad;
    int32_t as_m_pad;
    int32_t reserved;            /* set to 0 */
} R1MoeGatherParams;

/* ---------------------------------------------------------------------------------------
 * moe_silu_quant (cuda/moe.cu): for each item i (row r = rows_map[i], or i when rows_map is
 * 0; items with r < 0 are skipped) and channel c < inter:
 *   g = gu[r][c], u = gu[r][up_offset + c] (bf16), silu = g / (1 + e),
 *   e = (float)exp(-(double)g); a = bf16(silu * u) (f32 ops, round to nearest even);
 *   then act_quant's recipe on a: q[r][c] (fp8), scales[kb * m_pad + r] (SA layout).
 *   block: (R1_MOE_SILU_THREADS, 1, 1); dynamic smem: 0
 *   grid:  (ceil(items * inter/128 / R1_MOE_SILU_GROUPS_PER_BLOCK), 1, 1); 8 threads per
 *          128-channel group; groups numbered kb * items + i.
 *   Requires: inter % 128 == 0; ldg, up_offset % 8 == 0; ldq % 16 == 0; gu, q, scales
 *             16-byte aligned; m_pad % 4 == 0 and > every row.
 * ------------------------------------------------------------------------------------- */
#define R1_MOE_SILU_THREADS 256
#define R1_MOE_SILU_GROUPS_PER_BLOCK 32

typedef struct R1MoeSiluQuantParams {
    unsigned long long gu;       /* bf16 [rows][ldg]: gate [0, inter), up [up_offset, +inter) */
    unsigned long long q;        /* out: fp8 [rows][ldq]                                      */
    unsigned long long scales;   /* out: f32 SA [inter/128][m_pad]                            */
    unsigned long long rows_map; /* i32 [items] (e.g. dest_row) or 0 (row = item)             */
    int32_t items;
    int32_t inter;
    int32_t ldg;
    int32_t up_offset;
    int32_t ldq;
    int32_t m_pad;
} R1MoeSiluQuantParams;

/* ---------------------------------------------------------------------------------------
 * moe_unpermute (cuda/moe.cu): per token t and column c < n, over t's entries with
 * dest_row >= 0 in ASCENDING EXPERT ID order (cpu::moe::MoeCall's order):
 *   acc = 0; acc = acc + w * y[row][c] (f32, product and sum each rounded);
 *   routed = bf16(acc); out[t][c] = shared ? bf16(routed + shared[t][c]) : routed.
 *   block: (R1_MOE_UNPERMUTE_THREADS, 1, 1), 8 columns per thread; dynamic smem: 0
 *   grid:  (ceil(n / (8 * R1_MOE_UNPERMUTE_THREADS)), T, 1)
 *   Requires: n % 8 == 0; ldy, lds, ldo % 8 == 0; y, shared, out 16-byte aligned;
 *             top_k <= R1_MOE_MAX_TOP_K.
 * ------------------------------------------------------------------------------------- */
#define R1_MOE_UNPERMUTE_THREADS 128

typedef struct R1MoeUnpermuteParams {
    unsigned long long y;            /* bf16 [R][ldy] (down GEMM output, flat rows) */
    unsigned long long dest_row;     /* i32 [tokens * top_k]                        */
    unsigned long long topk_ids;     /* i32 [tokens * top_k]                        */
    unsigned long long topk_weights; /* f32 [tokens * top_k]                        */
    unsigned long long shared;       /* bf16 [tokens][lds] or 0                     */
    unsigned long long out;          /* out: bf16 [tokens][ldo]                     */
    int32_t tokens;
    int32_t top_k;
    int32_t n;
    int32_t ldy;
    int32_t lds;
    int32_t ldo;
} R1MoeUnpermuteParams;

/* ---------------------------------------------------------------------------------------
 * moe_gemm_ref (cuda/moe_gemm.cu): the grouped GEMM on CUDA cores, entry-driven (layout-
 * agnostic): for entry i with r = dest_row[i] >= 0 and e = expert_of[i] in [0, E):
 *   d[r][col] = fp8_gemm_ref's arithmetic on a[r] and expert e's weight row col.
 *   block: (16, 16, 1); grid: (ceil(N/16), ceil(entries/16), 1); dynamic smem: 0
 *   Any N, K >= 1 (ragged last K-block). Slow: tests and fallback.
 * ------------------------------------------------------------------------------------- */
typedef struct R1MoeGemmRefParams {
    unsigned long long a;         /* fp8 [R][lda] (flat rows)                    */
    unsigned long long b;         /* fp8 [E][n][ldb] stacked                      */
    unsigned long long sa;        /* f32 SA [ceil(k/128)][m_pad]                  */
    unsigned long long sb;        /* f32 [E][ceil(n/128)][ceil(k/128)]            */
    unsigned long long d;         /* out: bf16 [R][ldd]                           */
    unsigned long long dest_row;  /* i32 [entries]                                */
    unsigned long long expert_of; /* i32 [entries] (topk_ids)                     */
    int32_t entries;
    int32_t experts;
    int32_t n;
    int32_t k;
    int32_t lda;
    int32_t ldb;
    int32_t ldd;
    int32_t m_pad;
} R1MoeGemmRefParams;

/* ---------------------------------------------------------------------------------------
 * moe_gemm_contig_wgmma / moe_gemm_masked_wgmma / moe_gemm_masked_wgmma_m64
 * (cuda/moe_gemm.cu): fp8_gemm_wgmma's machinery (TMA -> mbarrier pipeline -> wgmma
 * m64n128k32 e4m3, producer warpgroup + BLOCK_M/64 consumer warpgroups, promotion every 128
 * of K, bf16 out), grouped. Persistent: CTA i runs tiles i, i+G, ... of the tiles in use,
 * found on the device (no host sync):
 *   contig: T = min(*num_blocks, max_blocks) * N/128 tiles, fp8_gemm's grouped-M order;
 *           tile (b, nb): expert block_expert[b], flat rows [128 b, 128 b + block_rows[b]).
 *   masked: per expert mb_e = ceil(min(counts[e], M) / BLOCK_M) M-blocks; experts in order,
 *           inside an expert M-block fastest; tile (e, mb, nb): flat rows
 *           [e M + mb BLOCK_M, + min(BLOCK_M, count_e - mb BLOCK_M)).
 *   Rows past a tile's valid rows are computed but never stored.
 *
 *                 contig_wgmma / masked_wgmma      masked_wgmma_m64
 *   BLOCK_M       128                              64
 *   block         (384, 1, 1)                      (256, 1, 1)
 *   dynamic smem  R1_MOE_GEMM_SMEM_BYTES           R1_MOE_GEMM_M64_SMEM_BYTES
 *   grid          (G, 1, 1), any G >= 1 (use #SMs)
 *
 *   Requires: N % 128 == 0, K % 128 == 0, K >= 128; 1 <= E <= R1_MOE_MAX_EXPERTS;
 *   E * N < 2^31; lda % 16 == 0 (TMA row stride); a, b, sa 16-byte aligned; d 4-byte
 *   aligned, ldd even. Tensor maps as fp8_gemm_wgmma's (same boxes, swizzles, OOB zero):
 *     tmap_a : UINT8,   globalDim {K, R},      globalStrides {lda},       box {128, BLOCK_M}
 *     tmap_b : UINT8,   globalDim {K, E * N},  globalStrides {K},         box {128, 128}
 *     tmap_sa: FLOAT32, globalDim {R, K/128},  globalStrides {r_pad * 4}, box {BLOCK_M, 1}
 * ------------------------------------------------------------------------------------- */
#define R1_MOE_GEMM_THREADS 384
#define R1_MOE_GEMM_M64_THREADS 256
/* fp8_gemm's bytes (R1_FP8_GEMM_SMEM_BYTES / _M64_) + 2 * (R1_MOE_MAX_EXPERTS + 1) * 4 bytes
 * of schedule (literal so bindgen exports it; moe_gemm.cu static_asserts the formula). */
#define R1_MOE_GEMM_SMEM_BYTES 203880
#define R1_MOE_GEMM_M64_SMEM_BYTES 202888

typedef struct R1MoeGemmParams {
    R1TensorMap tmap_a;              /* fp8 [R][lda] flat rows                 */
    R1TensorMap tmap_b;              /* fp8 [E * n][k] stacked experts         */
    R1TensorMap tmap_sa;             /* f32 SA [k/128][r_pad]                  */
    unsigned long long sb;           /* f32 [E][n/128][k/128]                  */
    unsigned long long d;            /* out: bf16 [R][ldd]                     */
    unsigned long long block_expert; /* contig: i32 [max_blocks]               */
    unsigned long long block_rows;   /* contig: i32 [max_blocks]               */
    unsigned long long num_blocks;   /* contig: i32 [1]                        */
    unsigned long long counts;       /* masked: i32 [experts]                  */
    int32_t n;
    int32_t k;
    int32_t ldd;
    int32_t experts;
    int32_t max_blocks;              /* contig                                 */
    int32_t max_tokens_per_expert;   /* masked (M)                             */
} R1MoeGemmParams;
/* END MOE SECTION ======================================================================= */

#endif /* R1_PARAMS_MOE_H */
