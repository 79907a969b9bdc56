/* Small graph ops (cuda/small_ops.cu). */
#ifndef R1_PARAMS_SMALL_OPS_H
#define R1_PARAMS_SMALL_OPS_H

#include <stdint.h>

#include "common.h"

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
 *   Absorbed kv_b (kv_b_proj as the absorption kernels read it, bf16): per head h the
 *                      (nope+v)*kv_lora elements at base(h) = h*(nope+v)*kv_lora hold W_UK[h]
 *                      transposed, [kv_lora][nope], then W_UV[h], [v][kv_lora] as in the
 *                      checkpoint: W_UK[h][i][l] = kv_b_proj[h*(nope+v) + i][l] is at
 *                      base(h) + l*nope + i, W_UV[h][d][l] = kv_b_proj[h*(nope+v) + nope + d][l]
 *                      at base(h) + (nope + d)*kv_lora + l (host: cuda::backend::absorbed_kv_b).
 *   small_mla_absorb_q q_lat[t][h][l] = sum_{i<nope} q[t][h*qk + i] * kv_b[base(h) + l*nope + i]
 *                      (f32 fmaf, i ascending), into out[t][h][0..kv_lora] (row stride
 *                      heads*(kv_lora+rope)); grid (tokens*heads), block 256.
 *   small_mla_absorb_o out[t][h*v + d] = sum_l o_lat[t][h][l] * kv_b[base(h) + (nope+d)*kv_lora + l];
 *                      grid (tokens*heads), block 256 (a warp per output).
 *   small_moe_accum    acc[t][c] += w * y[t][c] for the entry of `expert` among topk_ids[t]
 *                      (weight topk_weights[t][j]; nothing when not chosen); f32 acc.
 *   small_f32_to_bf16  out = bf16(a) (n elements).
 *
 * Fused decode-path kernels: each gives bit for bit what the unfused kernels named give in
 * sequence (same f32 operations, same reduction order, one bf16 rounding where those store
 * bf16), with fewer launches and without the intermediate round trips:
 *   small_rms_norm_quant  per row r: v = x[r], or with `residual`: v = bf16(x[r] + residual[r])
 *                      stored to sum[r] (small_add); inv as small_rms_norm; y = bf16((v * inv)
 *                      * w) stored to out[r] when out != 0 (small_rms_norm); when q != 0, y
 *                      quantized per 128-channel group into q [rows][ldq] and SA scales
 *                      [ceil(width/128)][m_pad] (act_quant / small_act_quant on y).
 *                      grid (rows), block 256 (R1_SMALL_THREADS). sum may be x or residual
 *                      (in place); with a residual, out may be x or residual too (both are
 *                      read before a block barrier); q and scales overlap nothing else.
 *   small_silu_mul_quant a = bf16(silu(gate) * up) (small_silu_mul), stored to out when
 *                      out != 0, quantized per 128-channel group into q and SA scales.
 *                      grid (ceil(rows * ceil(width/128) / 8)), block 256: a warp per group.
 *   small_mla_absorb_q_rope small_mla_absorb_q, and in the same CTA mla_q_rope of the token's
 *                      q_pe (src[t][h*(nope+rope) + nope ..]) into dst[t][h][kv_lora ..]
 *                      (cuda/params/mla.h's RoPE numerics); grid (tokens*heads), block 256.
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
    unsigned long long kv_b; /* bf16 absorbed kv_b: per head W_UK^T [kv_lora][nope],
                                then W_UV [v][kv_lora] (heads*(nope+v)*kv_lora)     */
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
typedef struct R1SmallNormQuantParams {
    unsigned long long x;        /* bf16 [rows][width]                                    */
    unsigned long long residual; /* bf16 [rows][width], or 0 (no add)                     */
    unsigned long long sum;      /* out: bf16 [rows][width] x + residual (with residual)  */
    unsigned long long w;        /* bf16 [width]                                          */
    unsigned long long out;      /* out: bf16 [rows][width] normed, or 0                  */
    unsigned long long q;        /* out: fp8 [rows][ldq], or 0                            */
    unsigned long long scales;   /* out: f32 SA [ceil(width/128)][m_pad] (with q)         */
    int32_t rows;
    int32_t width;
    int32_t ldq;
    int32_t m_pad;
    float eps;
    int32_t reserved;
} R1SmallNormQuantParams;

typedef struct R1SmallSiluQuantParams {
    unsigned long long gate;   /* bf16 [rows][width]                  */
    unsigned long long up;     /* bf16 [rows][width]                  */
    unsigned long long out;    /* out: bf16 [rows][width], or 0       */
    unsigned long long q;      /* out: fp8 [rows][ldq]                */
    unsigned long long scales; /* out: f32 SA [ceil(width/128)][m_pad] */
    int32_t rows;
    int32_t width;
    int32_t ldq;
    int32_t m_pad;
} R1SmallSiluQuantParams;

typedef struct R1SmallMlaAbsorbQRopeParams {
    R1SmallMlaAbsorbParams absorb; /* as small_mla_absorb_q                          */
    unsigned long long positions;  /* i32 [tokens]                                   */
    unsigned long long inv_freq;   /* f32 [rope / 2] (YaRN-corrected)                */
    float attention_factor;
    int32_t reserved;
} R1SmallMlaAbsorbQRopeParams;
/* END SMALL OPS SECTION ================================================================= */

#endif /* R1_PARAMS_SMALL_OPS_H */
