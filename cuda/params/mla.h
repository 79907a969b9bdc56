/* MLA attention (cuda/mla/). */
#ifndef R1_PARAMS_MLA_H
#define R1_PARAMS_MLA_H

#include <stdint.h>

#include "common.h"

/* =======================================================================================
 * MLA (cuda/mla/*.cu): paged latent KV cache, absorbed attention. BEGIN MLA SECTION
 *
 * Cache page layout (one per layer): bf16 cache[num_pages][R1_MLA_PAGE_TOKENS][width],
 *   width = kv_lora + rope; token at position `pos` of a sequence lives in page
 *   block_table[seq][pos / 64], slot pos % 64; entry = [rmsnorm(c_kv) * w (kv_lora) |
 *   rope(k_pe) (rope)]. block_table is int32 [num_seqs][bt_stride].
 * Queries: bf16 q[total_q][heads][width] = [q_nope . W_UK (kv_lora) | roped q_pe (rope)];
 *   sequence b owns query tokens q_starts[b] .. q_starts[b+1] (int32 [batch + 1]) and has
 *   seqlens_k[b] (int32 [batch]) cached tokens INCLUDING its q_len new ones, so query token
 *   i of b sits at position seqlens_k[b] - q_len + i and attends keys 0 ..= that position
 *   (causal; decode s_q = q_len in {1, 2}, chunked prefill any q_len).
 * Outputs: bf16 out[total_q][heads][kv_lora] (latent, to be multiplied by W_UV) and
 *   f32 lse[total_q][heads] = ln(sum_j exp(scale * q.k_j)) (-inf for a row with no keys,
 *   whose out row is 0). Softmax in f32 with the caller's scale (192^-0.5 * mscale^2).
 * Device data are never trusted for memory safety: seqlens_k is clamped to
 *   [0, 64 * bt_stride], q_len to [0, max_q_len] (a sequence whose q_starts are not
 *   0 <= q_starts[b] <= q_starts[b+1] <= total_q is skipped), a page id outside
 *   [0, num_pages) reads as zeros (cache write: the token is not written), a schedule part's
 *   sequence range is clamped to [0, batch), and a split slot outside the sequence's own
 *   splits[b] .. splits[b+1] - 1 or past `slots` is never written (decode) or read (combine).
 *   Such inputs give unspecified values, never out-of-bounds accesses.
 * RoPE: interleaved pairs (x[2i], x[2i+1]) rotated by angle = f32(pos) * inv_freq[i]
 *   (f32 products), cos/sin (sincosf) times attention_factor; a' = a*cos - b*sin,
 *   b' = b*cos + a*sin, each product and sum rounded separately (no FMA), as the CPU does.
 * --------------------------------------------------------------------------------------- */
#define R1_MLA_PAGE_TOKENS 64

/* ---------------------------------------------------------------------------------------
 * mla_cache_write: per token t, cache[page][pos % 64] = bf16([rmsnorm(c_kv) * w | rope(k_pe)])
 *   rmsnorm: ms = (sum_c v_c^2) / kv_lora (f32, tree order), inv = 1 / sqrtf(ms + eps)
 *   (IEEE), y = (v * inv) * w.  page = block_table[token_seq[t]][positions[t] / 64].
 *   block: R1_MLA_CACHE_WRITE_THREADS (128): one warp per token; dynamic smem 0
 *   grid:  (ceil(tokens / 4), 1, 1)
 *   Requires: kv_lora >= 1, rope even, ld_kv >= kv_lora + rope. Tokens with an invalid
 *   sequence, position or page are skipped.
 * ------------------------------------------------------------------------------------- */
#define R1_MLA_CACHE_WRITE_THREADS 128

typedef struct R1MlaCacheWriteParams {
    unsigned long long kv;          /* in:  bf16 [tokens][ld_kv]: c_kv (kv_lora) | k_pe (rope) */
    unsigned long long norm_w;      /* in:  bf16 [kv_lora] (kv_a_layernorm.weight)            */
    unsigned long long inv_freq;    /* in:  f32  [rope / 2] (YaRN-corrected)                  */
    unsigned long long positions;   /* in:  i32  [tokens]                                     */
    unsigned long long token_seq;   /* in:  i32  [tokens]: row of block_table                 */
    unsigned long long block_table; /* in:  i32  [num_seqs][bt_stride]                        */
    unsigned long long cache;       /* out: bf16 [num_pages][64][kv_lora + rope]              */
    int32_t tokens;
    int32_t kv_lora;
    int32_t rope;
    int32_t ld_kv;
    int32_t num_seqs;
    int32_t bt_stride;
    int32_t num_pages;
    float eps;
    float attention_factor;
    int32_t reserved;               /* set to 0 */
} R1MlaCacheWriteParams;

/* ---------------------------------------------------------------------------------------
 * mla_q_rope: dst(t, h, 0..rope) = rope(src(t, h, 0..rope), positions[t]), bf16 in and out,
 *   element (t, h, i) at ptr[t * ld_token + h * ld_head + i] (src and dst point at the first
 *   rotary element; dst may equal src: in place). Used to place roped q_pe after the latent
 *   query: dst = q + kv_lora with ld_head = width.
 *   block: R1_MLA_Q_ROPE_THREADS (256), one thread per pair; dynamic smem 0
 *   grid:  (ceil(tokens * heads * rope / 2 / 256), 1, 1)
 * ------------------------------------------------------------------------------------- */
#define R1_MLA_Q_ROPE_THREADS 256

typedef struct R1MlaQRopeParams {
    unsigned long long src;       /* bf16 */
    unsigned long long dst;       /* bf16 */
    unsigned long long positions; /* i32 [tokens] */
    unsigned long long inv_freq;  /* f32 [rope / 2] */
    int32_t tokens;
    int32_t heads;
    int32_t rope;
    int32_t src_ld_token;
    int32_t src_ld_head;
    int32_t dst_ld_token;
    int32_t dst_ld_head;
    float attention_factor;
} R1MlaQRopeParams;

/* ---------------------------------------------------------------------------------------
 * mla_attn_ref: the GPU-side reference and fallback (any kv_lora <= 512, any rope, any
 *   q_len): one CTA per (head, query token, sequence), 4 warps splitting the keys, online
 *   softmax (expf) per warp, merged at the end; f32 throughout, bf16 output.
 *   block: R1_MLA_REF_THREADS (128); dynamic smem 0
 *   grid:  (heads, max_q_len, batch)  (max_q_len, batch <= 65535)
 *   Requires: 1 <= kv_lora <= R1_MLA_REF_MAX_KV_LORA, kv_lora + rope <= R1_MLA_REF_MAX_WIDTH.
 * ------------------------------------------------------------------------------------- */
#define R1_MLA_REF_THREADS 128
#define R1_MLA_REF_MAX_KV_LORA 512
#define R1_MLA_REF_MAX_WIDTH 1024

typedef struct R1MlaAttnRefParams {
    unsigned long long q;           /* bf16 [total_q][heads][width]          */
    unsigned long long cache;       /* bf16 [num_pages][64][width]           */
    unsigned long long block_table; /* i32  [batch][bt_stride]               */
    unsigned long long seqlens_k;   /* i32  [batch]                          */
    unsigned long long q_starts;    /* i32  [batch + 1]                      */
    unsigned long long out;         /* bf16 [total_q][heads][kv_lora]        */
    unsigned long long lse;         /* f32  [total_q][heads]                 */
    int32_t batch;
    int32_t heads;
    int32_t kv_lora;
    int32_t rope;
    int32_t bt_stride;
    int32_t num_pages;
    int32_t total_q;
    int32_t max_q_len;
    float scale;
    int32_t reserved;               /* set to 0 */
} R1MlaAttnRefParams;

/* ---------------------------------------------------------------------------------------
 * Fast path (kv_lora 512, rope 64 only): split-KV over all SMs.
 *
 * 1. mla_schedule (once per batch layout, shared by every layer): balances the key blocks
 *    (64 tokens) of all sequences over `num_parts` CTAs per 64-row head block, each
 *    sequence costing ceil(L/64) + R1_MLA_SCHED_FIXED_OVERHEAD block-equivalents:
 *      sched[part][8] = {begin_b, begin_blk, end_b, end_blk, begin_split, 0, 0, 0}: part
 *        runs blocks [begin_blk, ...) of sequence begin_b, whole sequences in between, and
 *        blocks [0, end_blk) of end_b (its blocks [begin_blk, end_blk) when begin_b == end_b);
 *        begin_split is the split index its first sequence gets (later ones get 0).
 *      splits[batch + 1]: prefix sums of the number of splits per sequence (splits[0] = 0);
 *        sequence b's partial results use slots splits[b] .. splits[b+1] - 1; a sequence
 *        with a single split is written straight to out/lse. Total slots <= batch + num_parts.
 *    block: (32, 1, 1); grid (1, 1, 1); static smem 4 * R1_MLA_SCHED_MAX_BATCH bytes.
 *    Requires batch <= R1_MLA_SCHED_MAX_BATCH, num_parts >= 1.
 *
 * 2. mla_decode_wgmma: rows = (query token, head) pairs of a sequence, 64 per head block;
 *    CTA (hb, part) runs head block hb of every (sequence, block range) of its part:
 *    TMA loads Q (64 x 576) and 64-token cache pages (64 x 576) into 128-byte-swizzled
 *    shared memory (two stages), warpgroup c in {0, 1} computes S[:, 32c .. 32c + 32) = Q K^T
 *    with wgmma m64n32k16, the row maxima are exchanged through shared memory, P (bf16) is
 *    written to shared memory, and warpgroup c accumulates O[:, 256c .. 256c + 256) += P V
 *    with wgmma m64n256k16 (V = the page's c_kv columns read N-major). Online softmax in
 *    exp2 with scale_log2 = scale * log2(e). Keys past seqlens_k in the last page are
 *    masked and their V rows zeroed in shared memory (stale cache bytes, even NaN, never
 *    reach the output); a head block stops at the last key its last query token sees.
 *    A sequence with seqlens_k[b] < q_len (invalid) may leave its rows unwritten.
 *    block: (R1_MLA_DECODE_THREADS = 384: warpgroup 0 issues TMA (one thread; registers
 *    lowered to R1_REALLOC_PRODUCER_REGS), warpgroups 1-2 compute (raised to
 *    R1_REALLOC_CONSUMER_REGS))
 *    dynamic smem: R1_MLA_DECODE_SMEM_BYTES (> 48 KiB: raise the function's limit first)
 *    grid:  (ceil(max_q_len * heads / 64), num_parts, 1)
 *    Partial results (sequences with several splits): o_accum f32
 *    [slots][max_q_len * heads][512] (normalized O of the split), lse_accum f32
 *    [slots][max_q_len * heads] (log2 domain; -inf when the split saw no key).
 *    Tensor maps (cuTensorMapEncodeTiled, UINT8 view of the bf16 rows, rank 2, element
 *    strides {1, 1}, no interleave, CU_TENSOR_MAP_SWIZZLE_128B, OOB fill NONE = zeros):
 *      tmap_q     : globalDim {1152, total_q * heads},     globalStrides {1152}, box {128, 64}
 *      tmap_cache : globalDim {1152, num_pages * 64},      globalStrides {1152}, box {128, 64}
 *    Requires: q and cache 16-byte aligned, total_q * heads and num_pages * 64 + 64 < 2^31.
 *
 * 3. mla_combine (only when num_parts > 1): per sequence with >= 2 splits and row r:
 *    w_s = exp2(lse_s - max_s lse_s), out = sum_s w_s o_s / sum_s w_s (bf16),
 *    lse = (max + log2(sum w)) * ln 2.
 *    block: (R1_MLA_COMBINE_THREADS = 256: one warp per row); dynamic smem 0
 *    grid:  (ceil(max_q_len * heads / 8), batch, 1)
 * ------------------------------------------------------------------------------------- */
#define R1_MLA_KV_LORA 512
#define R1_MLA_ROPE 64
#define R1_MLA_BLOCK_M 64
#define R1_MLA_SCHED_FIXED_OVERHEAD 5
#define R1_MLA_SCHED_MAX_BATCH 4096
#define R1_MLA_SCHED_FIELDS 8
#define R1_MLA_DECODE_THREADS 384
#define R1_MLA_COMBINE_THREADS 256
/* Q 73728 + 2 x K 73728 + P 8192 + row stats 1024 + barriers 64 from the 1024-aligned
 * dynamic shared memory base (cuda/mla/decode.cu static_asserts the sum and traps on a misaligned base). */
#define R1_MLA_DECODE_SMEM_BYTES 230464

typedef struct R1MlaScheduleParams {
    unsigned long long seqlens_k; /* in:  i32 [batch]                        */
    unsigned long long sched;     /* out: i32 [num_parts][8]                 */
    unsigned long long splits;    /* out: i32 [batch + 1]                    */
    int32_t batch;
    int32_t bt_stride;
    int32_t num_parts;
    int32_t fixed_overhead;       /* R1_MLA_SCHED_FIXED_OVERHEAD             */
} R1MlaScheduleParams;

typedef struct R1MlaDecodeParams {
    R1TensorMap tmap_q;
    R1TensorMap tmap_cache;
    unsigned long long block_table; /* i32  [batch][bt_stride]                  */
    unsigned long long seqlens_k;   /* i32  [batch]                             */
    unsigned long long q_starts;    /* i32  [batch + 1]                         */
    unsigned long long out;         /* bf16 [total_q][heads][512]               */
    unsigned long long lse;         /* f32  [total_q][heads]                    */
    unsigned long long sched;       /* i32  [num_parts][8]                      */
    unsigned long long splits;      /* i32  [batch + 1]                         */
    unsigned long long o_accum;     /* f32  [slots][max_q_len * heads][512]     */
    unsigned long long lse_accum;   /* f32  [slots][max_q_len * heads]          */
    int32_t batch;
    int32_t heads;
    int32_t bt_stride;
    int32_t num_pages;
    int32_t total_q;
    int32_t max_q_len;
    int32_t num_parts;
    float scale_log2;               /* softmax scale * log2(e)                  */
    int32_t slots;                  /* partial-result slots o_accum/lse_accum hold */
} R1MlaDecodeParams;

typedef struct R1MlaCombineParams {
    unsigned long long q_starts;  /* i32  [batch + 1]                         */
    unsigned long long splits;    /* i32  [batch + 1]                         */
    unsigned long long o_accum;   /* f32  [slots][max_q_len * heads][512]     */
    unsigned long long lse_accum; /* f32  [slots][max_q_len * heads]          */
    unsigned long long out;       /* bf16 [total_q][heads][512]               */
    unsigned long long lse;       /* f32  [total_q][heads]                    */
    int32_t batch;
    int32_t heads;
    int32_t total_q;
    int32_t max_q_len;
    int32_t slots;                /* partial-result slots o_accum/lse_accum hold */
} R1MlaCombineParams;
/* END MLA SECTION ======================================================================= */

#endif /* R1_PARAMS_MLA_H */
