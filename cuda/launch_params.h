/*
 * Launch-parameter structs shared by the CUDA kernels (the .cu files in cuda/) and Rust
 * (build.rs runs bindgen on this file and writes $OUT_DIR/launch_params.rs). Plain C:
 * fixed-width types, device pointers as unsigned long long, no CUDA headers. Every kernel is
 * `extern "C" __global__` and takes exactly one of these structs by value.
 *
 * Conventions
 *   - Matrices are row-major; "ld*" is the row stride in ELEMENTS of the buffer's type.
 *   - bf16 is IEEE bfloat16, fp8 is float8_e4m3fn (OCP E4M3: no inf, max 448).
 *   - Quantization block: R1_QUANT_BLOCK (128) channels along K.
 *
 * Activation-scale layout ("SA layout", written by act_quant, read by both GEMMs):
 *   f32 sa[kb * m_pad + r] = scale of row r, channels [128*kb, 128*kb + 128),
 *   m_pad = M rounded up to a multiple of R1_ACT_SCALE_M_ALIGN (4) so every K-block column is
 *   16-byte aligned for TMA; the buffer holds (K/128) * m_pad floats. Entries r in [M, m_pad)
 *   are never written nor read. (MN-major, i.e. column-major [M, K/128], as DeepGEMM wants.)
 *
 * Weight-scale layout (the checkpoint's weight_scale_inv, a MULTIPLIER):
 *   f32 sb[(n / 128) * ceil(K/128) + kb], shape [ceil(N/128), ceil(K/128)], row-major.
 *
 * w8a8 numerics (DESIGN.md):
 *   act_quant:  amax = max_i |x_i| over the 128 channels (exact, bf16 -> f32),
 *               s = max(amax, 1e-4f) / 448.0f                  (f32 IEEE division)
 *               q_i = e4m3(x_i / s)  (f32 IEEE division, round to nearest even, saturate to +-448)
 *   GEMM:       for each K-block kb: part = sum_k fp8(a) * fp8(b) in f32,
 *               acc = fmaf(part, sa[m,kb] * sb[n/128,kb], acc);  D = bf16_rn(acc).
 *   fp8_gemm_ref sums each part sequentially with fmaf (k ascending) and is reproducible
 *   bit-exactly on the CPU in that order; the wgmma kernel sums part on the tensor cores
 *   (different order and reduced internal precision), so compare it with a tolerance.
 */
#ifndef R1_LAUNCH_PARAMS_H
#define R1_LAUNCH_PARAMS_H

#include <stdint.h>

#define R1_QUANT_BLOCK 128
#define R1_ACT_SCALE_M_ALIGN 4

/* ---------------------------------------------------------------------------------------
 * act_quant  (cuda/act_quant.cu): bf16 [M, K] -> fp8 [M, K] + f32 scales (SA layout)
 *   block: R1_ACT_QUANT_THREADS (256, 1, 1); dynamic smem: 0
 *   grid:  (ceil(M * (K/128) / R1_ACT_QUANT_GROUPS_PER_BLOCK), 1, 1)
 *   8 threads quantize one 128-channel group (16 channels each: two 16-byte loads, one
 *   16-byte store); groups are numbered g = kb * M + r (row fastest).
 *   Requires: K % 128 == 0; x, q 16-byte aligned; ldx % 8 == 0; ldq % 16 == 0;
 *             m_pad >= M, m_pad % 4 == 0; scales 16-byte aligned.
 * ------------------------------------------------------------------------------------- */
#define R1_ACT_QUANT_THREADS 256
#define R1_ACT_QUANT_GROUPS_PER_BLOCK 32

typedef struct R1ActQuantParams {
    unsigned long long x;      /* in:  bf16 [m][ldx]; columns [0, k) are quantized        */
    unsigned long long q;      /* out: fp8  [m][ldq]                                        */
    unsigned long long scales; /* out: f32  [k/128][m_pad] (SA layout)                      */
    int32_t m;
    int32_t k;
    int32_t ldx;
    int32_t ldq;
    int32_t m_pad;
    int32_t reserved;          /* set to 0 */
} R1ActQuantParams;

/* ---------------------------------------------------------------------------------------
 * fp8_gemm_ref  (cuda/fp8_gemm.cu): D[M,N] = w8a8(A[M,K], B[N,K]), CUDA cores, any shape
 *   block: (R1_FP8_GEMM_REF_TILE, R1_FP8_GEMM_REF_TILE, 1) = (16, 16, 1); dynamic smem: 0
 *   grid:  (ceil(N/16), ceil(M/16), 1); thread (x, y) computes D[16*by + y][16*bx + x].
 *   Any M, N, K >= 1 (a ragged last K-block is summed over its valid columns). Slow: tests.
 * ------------------------------------------------------------------------------------- */
#define R1_FP8_GEMM_REF_TILE 16

typedef struct R1Fp8GemmRefParams {
    unsigned long long a;  /* fp8  [m][lda]                                   */
    unsigned long long b;  /* fp8  [n][ldb]  (weights, K-major)               */
    unsigned long long sa; /* f32  [ceil(k/128)][m_pad] (SA layout)           */
    unsigned long long sb; /* f32  [ceil(n/128)][ceil(k/128)]                 */
    unsigned long long d;  /* bf16 [m][ldd]                                   */
    int32_t m;
    int32_t n;
    int32_t k;
    int32_t lda;
    int32_t ldb;
    int32_t ldd;
    int32_t m_pad;
    int32_t reserved;      /* set to 0 */
} R1Fp8GemmRefParams;

/* ---------------------------------------------------------------------------------------
 * CUtensorMap as an opaque blob: the host fills it with cuTensorMapEncodeTiled (driver API)
 * and copies the 128 bytes in. Same size and alignment as CUDA 13's CUtensorMap.
 * ------------------------------------------------------------------------------------- */
typedef struct R1TensorMap {
    __attribute__((aligned(128))) uint64_t opaque[16];
} R1TensorMap;

/* ---------------------------------------------------------------------------------------
 * fp8_gemm_wgmma / fp8_gemm_wgmma_m64  (cuda/fp8_gemm.cu): same math as fp8_gemm_ref,
 * Hopper (sm_90a) path: TMA -> R1_FP8_GEMM*_STAGES-deep mbarrier pipeline -> wgmma
 * m64n128k32 e4m3, one producer warpgroup + BLOCK_M/64 consumer warpgroups, f32 promotion
 * every 128 of K, bf16 output (predicated: any M, any N).
 *
 *                     fp8_gemm_wgmma         fp8_gemm_wgmma_m64 (for M <= 64, decode)
 *   BLOCK_M           128                    64
 *   block             (384, 1, 1)            (256, 1, 1)
 *   dynamic smem      R1_FP8_GEMM_SMEM_BYTES R1_FP8_GEMM_M64_SMEM_BYTES
 *                     (> 48 KiB: set CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES first)
 *   grid              (G, 1, 1), any G >= 1. Persistent: CTA i runs tiles i, i+G, i+2G, ...
 *                     of T = ceil(M/BLOCK_M) * ceil(N/128) tiles; use G = min(T, #SMs).
 *                     Tile order: groups of R1_FP8_GEMM_GROUP_M M-blocks, M-block fastest.
 *
 *   Requires: K % 128 == 0, K >= 128; lda % 16 == 0 and ldb % 16 == 0 (TMA strides, in bytes
 *   = elements); a, b, sa 16-byte aligned; d 4-byte aligned and ldd even.
 *
 *   Tensor maps (cuTensorMapEncodeTiled, rank 2, dims/strides innermost first,
 *   elementStrides {1, 1}, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE
 *   (out-of-bounds reads as zero), L2 promotion CU_TENSOR_MAP_L2_PROMOTION_L2_256B):
 *     tmap_a : UINT8,   globalDim {K, M},    globalStrides {lda},       boxDim {128, BLOCK_M},
 *              CU_TENSOR_MAP_SWIZZLE_128B
 *     tmap_b : UINT8,   globalDim {K, N},    globalStrides {ldb},       boxDim {128, 128},
 *              CU_TENSOR_MAP_SWIZZLE_128B
 *     tmap_sa: FLOAT32, globalDim {M, K/128}, globalStrides {m_pad * 4}, boxDim {BLOCK_M, 1},
 *              CU_TENSOR_MAP_SWIZZLE_NONE
 *   (globalStrides lists the stride of dimension 1 in bytes; dimension 0 is contiguous.)
 *   The maps hold the buffer addresses, so re-encode them when a buffer moves; they can be
 *   built once per (buffer, shape) and reused across launches and CUDA-graph replays.
 * ------------------------------------------------------------------------------------- */
#define R1_FP8_GEMM_BLOCK_N 128
#define R1_FP8_GEMM_BLOCK_K 128
#define R1_FP8_GEMM_GROUP_M 8

#define R1_FP8_GEMM_BLOCK_M 128
#define R1_FP8_GEMM_THREADS 384
#define R1_FP8_GEMM_STAGES 6

#define R1_FP8_GEMM_M64_BLOCK_M 64
#define R1_FP8_GEMM_M64_THREADS 256
#define R1_FP8_GEMM_M64_STAGES 8

/* Dynamic shared memory (its base is 1024-byte aligned; the kernels trap otherwise): per
 * stage (A tile BLOCK_M*128 + B tile 128*128 + activation scales BLOCK_M*4) + two 8-byte
 * mbarriers per stage. (Literal values so bindgen exports them; fp8_gemm.cu static_asserts
 * the formula.) */
#define R1_FP8_GEMM_SMEM_BYTES 199776
#define R1_FP8_GEMM_M64_SMEM_BYTES 198784

/* Register reallocation of the 384-thread kernels (fp8_gemm_wgmma, moe_gemm_contig_wgmma,
 * moe_gemm_masked_wgmma, mla_decode_wgmma): warpgroup 0 (producer) lowers its registers to
 * R1_REALLOC_PRODUCER_REGS with setmaxnreg.dec, the two consumer warpgroups raise theirs to
 * R1_REALLOC_CONSUMER_REGS with setmaxnreg.inc. The CTA's register file is fixed at launch,
 * so the kernel must be launched with at least
 * (128 * PRODUCER + 256 * CONSUMER) / 384 = 168 registers per thread, or the consumers' inc
 * waits forever; the host checks CU_FUNC_ATTRIBUTE_NUM_REGS of each at load. */
#define R1_REALLOC_PRODUCER_REGS 40
#define R1_REALLOC_CONSUMER_REGS 232

typedef struct R1Fp8GemmParams {
    R1TensorMap tmap_a;    /* A  fp8 [m][lda]                                   */
    R1TensorMap tmap_b;    /* B  fp8 [n][ldb]                                   */
    R1TensorMap tmap_sa;   /* sa f32 [k/128][m_pad] (SA layout)                 */
    unsigned long long sb; /* f32  [ceil(n/128)][k/128]                         */
    unsigned long long d;  /* bf16 [m][ldd]                                     */
    int32_t m;
    int32_t n;
    int32_t k;
    int32_t ldd;
} R1Fp8GemmParams;

/* =======================================================================================
 * MLA (cuda/mla.cu): paged latent KV cache, absorbed attention. BEGIN MLA SECTION
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
 * dynamic shared memory base (mla.cu static_asserts the sum and traps on a misaligned base). */
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
 * order of cpu::linear::dot (8 running sums acc[l] += x[8i+l] * w[8i+l], product and sum
 * each rounded, then ((acc0 + acc1) + ...) + acc7): bit-identical to the CPU router logits.
 * CUDA cores (the exact-order reference; not a tensor-core GEMM).
 *   block: (R1_MOE_LOGITS_THREADS, 1, 1); dynamic smem: 0
 *   grid:  (ceil(E / 128), ceil(T / R1_MOE_LOGITS_TOKENS), 1); thread x of block (bx, by):
 *          expert 128 bx + x, tokens [4 by, 4 by + 4).
 *   Requires: H % 8 == 0, ldx % 8 == 0, x and w 16-byte aligned.
 * ------------------------------------------------------------------------------------- */
#define R1_MOE_LOGITS_THREADS 128
#define R1_MOE_LOGITS_TOKENS 4

typedef struct R1MoeRouterLogitsParams {
    unsigned long long x;      /* bf16 [tokens][ldx]                          */
    unsigned long long w;      /* bf16 [experts][hidden] (mlp.gate.weight)    */
    unsigned long long logits; /* out: f32 [tokens][experts]                  */
    int32_t tokens;
    int32_t experts;
    int32_t hidden;
    int32_t ldx;
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
/* SMALL OPS SECTION ======================================================================
 * cuda/small_ops.cu: simple, obviously-correct kernels for the graph ops no other kernel
 * covers (src/cuda/ops/small_ops.rs checks every rule below on the host). bf16 is
 * __nv_bfloat16; every reduction and product is computed in f32 and rounded once on store.
 * Matrices are row-major with the given leading dimensions (elements).
 *
 *   small_embed        out[r][c] = table[ids[r]][c]; bf16 table [vocab][width], i32 ids
 *                      (each in 0..vocab, else the row is zeroed). grid (rows), block 256.
 *   small_rms_norm     out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w; block 256 per row.
 *   small_add          out = a + b (bf16, n elements); grid ceil(n/256), block 256.
 *   small_silu_mul     out = silu(a) * b with silu(g) = g / (1 + exp(-g)).
 *   small_copy_rows    dst[r * ldd + dst_col + c] = src[row(r) * lds + src_col + c],
 *                      row(r) = row_map ? row_map[r] : r, c < cols; bf16; grid (ceil(cols/256),
 *                      rows), block 256 (concat, select rows, cache growth).
 *   small_zero_pos0    x[r][:] = 0 where positions[r] == 0; grid (rows), block 256.
 *   small_gemm_bf16    out[m][n] = sum_k x[m][k] * w[n][k], f32 accumulation, out f32
 *                      (out_f32 != 0) or bf16; 16x16 output tile per block of (16, 16).
 *   small_act_quant    act_quant for any K (ragged last 128-group, any ld): per row per
 *                      group s = max(amax, 1e-4) / 448, q = e4m3(x / s) (RNE, saturating);
 *                      scales SA [ceil(K/128)][m_pad]; grid (ceil(K/128), m), block 128.
 *   small_mla_absorb_q q_lat[t][h][l] = sum_{i<nope} q[t][h*qk + i] * kv_b[h*(nope+v) + i][l]
 *                      into out[t][h][0..kv_lora] (row stride heads*(kv_lora+rope));
 *                      grid (tokens*heads), block 256.
 *   small_mla_absorb_o out[t][h*v + d] = sum_l o_lat[t][h][l] * kv_b[h*(nope+v)+nope+d][l];
 *                      grid (tokens*heads), block 256 (a warp per output).
 *   small_moe_accum    acc[t][c] += w * y[t][c] for the entry of `expert` among topk_ids[t]
 *                      (weight topk_weights[t][j]; nothing when not chosen); f32 acc.
 *   small_f32_to_bf16  out = bf16(a) (n elements).
 * ------------------------------------------------------------------------------------- */
#define R1_SMALL_THREADS 256
#define R1_SMALL_GEMM_TILE 16

typedef struct R1SmallEmbedParams {
    unsigned long long table; /* bf16 [vocab][width] */
    unsigned long long ids;   /* i32 [rows]          */
    unsigned long long out;   /* bf16 [rows][width]  */
    int32_t rows;
    int32_t width;
    int32_t vocab;
    int32_t reserved;
} R1SmallEmbedParams;

typedef struct R1SmallRmsNormParams {
    unsigned long long x;   /* bf16 [rows][width] */
    unsigned long long w;   /* bf16 [width]       */
    unsigned long long out; /* bf16 [rows][width] */
    int32_t rows;
    int32_t width;
    float eps;
    int32_t reserved;
} R1SmallRmsNormParams;

typedef struct R1SmallEltwiseParams {
    unsigned long long a;   /* bf16 [n] (f32 for small_f32_to_bf16) */
    unsigned long long b;   /* bf16 [n] (unused by small_f32_to_bf16) */
    unsigned long long out; /* bf16 [n] */
    long long n;
} R1SmallEltwiseParams;

typedef struct R1SmallCopyRowsParams {
    unsigned long long src;     /* bf16 */
    unsigned long long dst;     /* bf16 */
    unsigned long long row_map; /* i32 [rows] or 0 */
    int32_t rows;
    int32_t cols;
    int32_t lds;
    int32_t ldd;
    int32_t src_col;
    int32_t dst_col;
} R1SmallCopyRowsParams;

typedef struct R1SmallZeroPos0Params {
    unsigned long long x;         /* bf16 [rows][width] */
    unsigned long long positions; /* i32 [rows]         */
    int32_t rows;
    int32_t width;
} R1SmallZeroPos0Params;

typedef struct R1SmallGemmBf16Params {
    unsigned long long x;   /* bf16 [m][ldx] */
    unsigned long long w;   /* bf16 [n][ldw] */
    unsigned long long out; /* f32 or bf16 [m][ldo] */
    int32_t m;
    int32_t n;
    int32_t k;
    int32_t ldx;
    int32_t ldw;
    int32_t ldo;
    int32_t out_f32;
    int32_t reserved;
} R1SmallGemmBf16Params;

typedef struct R1SmallActQuantParams {
    unsigned long long x;      /* bf16 [m][ldx]            */
    unsigned long long q;      /* fp8 [m][ldq]             */
    unsigned long long scales; /* f32 [ceil(k/128)][m_pad] */
    int32_t m;
    int32_t k;
    int32_t ldx;
    int32_t ldq;
    int32_t m_pad;
    int32_t reserved;
} R1SmallActQuantParams;

typedef struct R1SmallMlaAbsorbParams {
    unsigned long long src;  /* absorb_q: bf16 q [tokens][heads*(nope+rope)];
                                absorb_o: bf16 o_lat [tokens][heads][kv_lora] */
    unsigned long long kv_b; /* bf16 [heads*(nope+v)][kv_lora] */
    unsigned long long dst;  /* absorb_q: bf16 [tokens][heads][kv_lora+rope];
                                absorb_o: bf16 [tokens][heads*v] */
    int32_t tokens;
    int32_t heads;
    int32_t nope;
    int32_t rope;
    int32_t v;
    int32_t kv_lora;
} R1SmallMlaAbsorbParams;

typedef struct R1SmallMoeAccumParams {
    unsigned long long y;            /* bf16 [tokens][width] */
    unsigned long long acc;          /* f32 [tokens][width]  */
    unsigned long long topk_ids;     /* i32 [tokens][top_k]  */
    unsigned long long topk_weights; /* f32 [tokens][top_k]  */
    int32_t tokens;
    int32_t width;
    int32_t top_k;
    int32_t expert;
} R1SmallMoeAccumParams;
/* END SMALL OPS SECTION ================================================================= */

/* PROBE SECTION ==========================================================================
 * cuda/probe.cu: layout probes, diagnostics only (src/cuda/ops/probe.rs, tests/gpu_probes.rs).
 * Each runs one piece of the fast kernels' Hopper machinery in isolation, so that a wrong
 * result names the piece instead of "the GEMM is wrong".
 *
 * probe_wgmma_m64n128k32 / probe_wgmma_m64n128k32x4: the wgmma path without TMA.
 *   One warpgroup copies A fp8 [64][K] and B fp8 [128][K] (row-major, row stride K) from
 *   global into shared memory in the layout TMA writes with CU_TENSOR_MAP_SWIZZLE_128B:
 *   tiles 1024-byte aligned, rows of 128 bytes (bytes of K past K zero), 16-byte chunk c of
 *   row r stored at chunk c ^ (r % 8), so 8 rows form one 1024-byte swizzle atom. It builds
 *   the descriptors with r1::smem_desc_k_sw128 (cuda/ptx.cuh) and runs wgmma m64n128k32 e4m3:
 *     probe_wgmma_m64n128k32     K = 32:  one wgmma
 *     probe_wgmma_m64n128k32x4   K = 128: four, descriptors advanced by 32 bytes per step
 *                                (+2 encoded) exactly as the GEMM pipeline does
 *   then writes the raw accumulators in register order, no layout transformation:
 *     out[t * 64 + j] = register j of thread t = D[row][col] of D = A B^T (f32),
 *     row = 16*(t/32) + (t%32)/4 + 8*((j/2)%2), col = 8*(j/4) + 2*(t%4) + (j%2) (ptx.cuh).
 *   block: (R1_PROBE_WGMMA_THREADS, 1, 1) = 128; grid (1, 1, 1);
 *   dynamic smem R1_PROBE_WGMMA_SMEM_BYTES (A tile 64 x 128 + B tile 128 x 128 bytes).
 *   Requires: a, b, out 16-byte aligned; a holds 64*K bytes, b 128*K, out 128*64 floats.
 * ------------------------------------------------------------------------------------- */
#define R1_PROBE_WGMMA_THREADS 128
#define R1_PROBE_WGMMA_SMEM_BYTES 24576

typedef struct R1ProbeWgmmaParams {
    unsigned long long a;   /* in:  fp8 [64][K]            */
    unsigned long long b;   /* in:  fp8 [128][K]           */
    unsigned long long out; /* out: f32 [128 threads][64]  */
} R1ProbeWgmmaParams;
/* END PROBE SECTION ===================================================================== */

#endif /* R1_LAUNCH_PARAMS_H */
