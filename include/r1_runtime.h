/* r1-runtime C ABI: DeepSeek-R1 / DeepSeek-V3 inference at the token level.
 *
 * Link against libr1_runtime.so (cargo build --release: target/release/libr1_runtime.so).
 * The definitions behind this header are in src/capi.rs.
 *
 * Conventions:
 *  - Every fallible call returns an r1_status (R1_OK is 0). On failure r1_last_error() gives
 *    the message for the calling thread, valid until that thread's next call.
 *  - NULL pointers, buffers that are too small, a sequence passed twice in one step or used
 *    with an engine that did not create it are reported as R1_ERR_ARGUMENT.
 *  - An engine serializes its calls: it may be shared between threads.
 *  - Free every sequence (r1_sequence_free) before its engine (r1_engine_free).
 */
#ifndef R1_RUNTIME_H
#define R1_RUNTIME_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum r1_status {
    R1_OK = 0,
    R1_ERR_ARGUMENT = 1,    /* NULL pointer, buffer too small, foreign sequence, bad enum value */
    R1_ERR_INPUT = 2,       /* token ids, lengths or sampling settings the model cannot take */
    R1_ERR_UNSUPPORTED = 3, /* valid but not supported (checkpoint shape, backend/precision) */
    R1_ERR_CHECKPOINT = 4,  /* missing or malformed files, tensors or config */
    R1_ERR_BACKEND = 5,     /* the compute backend (device errors, out of memory) */
    R1_ERR_PANIC = 6        /* a bug inside the library; the engine is unusable afterwards */
} r1_status;

typedef struct r1_engine r1_engine;
typedef struct r1_sequence r1_sequence;

typedef struct r1_engine_options {
    int32_t backend;       /* 0: CPU, 1: CUDA (one Hopper GPU, precision must be w8a8) */
    int32_t precision;     /* 0: exact (f32 reference), 1: w8a8 (the GPU recipe) */
    int32_t with_mtp;      /* non-zero: load the MTP layer when the checkpoint has one */
    uint64_t cache_tokens; /* KV cache capacity in tokens, over all sequences */
} r1_engine_options;

typedef struct r1_model_info {
    uint64_t vocab_size;
    uint64_t hidden_size;
    uint64_t max_context;
    uint32_t eos_token_id; /* UINT32_MAX when the config names none */
    int32_t has_mtp;
    uint64_t cache_pages_capacity;
    uint64_t cache_pages_in_use;
    uint64_t page_tokens;  /* tokens per KV cache page */
} r1_model_info;

typedef struct r1_sampling {
    float temperature;  /* 0: greedy */
    uint32_t top_k;     /* 0: all tokens */
    float top_p;        /* 1.0: all tokens */
    uint64_t seed;
    int32_t ignore_eos; /* non-zero: keep generating past end-of-sequence tokens */
} r1_sampling;

/* The library version, e.g. "0.1.0" (static). */
const char* r1_version(void);
/* This thread's last error message, or NULL after a successful call. */
const char* r1_last_error(void);

r1_status r1_engine_options_default(r1_engine_options* out);
/* Loads config.json + safetensors from model_dir (options NULL: defaults). */
r1_status r1_engine_load(const char* model_dir, const r1_engine_options* options, r1_engine** out);
void r1_engine_free(r1_engine* engine);
r1_status r1_engine_info(const r1_engine* engine, r1_model_info* out);

r1_status r1_sequence_new(const r1_engine* engine, r1_sequence** out);
/* Frees the sequence and returns its cache pages (seq NULL: nothing). */
r1_status r1_sequence_free(const r1_engine* engine, r1_sequence* seq);
uint64_t r1_sequence_len(const r1_sequence* seq);
/* A new sequence with the first len positions of seq, sharing its cache pages (copy on write). */
r1_status r1_sequence_fork(const r1_engine* engine, const r1_sequence* seq, uint64_t len, r1_sequence** out);
/* Forgets positions len.. (e.g. rejected draft tokens). */
r1_status r1_sequence_truncate(const r1_engine* engine, r1_sequence* seq, uint64_t len);

/* One forward step over n sequences: sequence i appends counts[i] tokens from tokens[i]; the
 * logits of its last token go to logits[i * vocab_size ...]; logits_len >= n * vocab_size. */
r1_status r1_forward(const r1_engine* engine, r1_sequence* const* seqs, const uint32_t* const* tokens,
                     const uint64_t* counts, uint64_t n, float* logits, uint64_t logits_len);

/* r1_forward with logits for the last rows[i] tokens of sequence i (1 <= rows[i] <= counts[i],
 * e.g. 1 + drafts when verifying speculative tokens), packed in order:
 * logits_len >= (rows[0] + ... + rows[n-1]) * vocab_size. */
r1_status r1_forward_rows(const r1_engine* engine, r1_sequence* const* seqs, const uint32_t* const* tokens,
                          const uint64_t* counts, const uint64_t* rows, uint64_t n, float* logits,
                          uint64_t logits_len);

r1_status r1_sampling_default(r1_sampling* out);
/* Up to max_new_tokens after prompt (stopping after an end-of-sequence token, which is
 * included); out_cap >= max_new_tokens; *out_len receives the count. sampling NULL: greedy. */
r1_status r1_generate(const r1_engine* engine, const uint32_t* prompt, uint64_t prompt_len, uint64_t max_new_tokens,
                      const r1_sampling* sampling, uint32_t* out_tokens, uint64_t out_cap, uint64_t* out_len);

#ifdef __cplusplus
}
#endif

#endif /* R1_RUNTIME_H */
