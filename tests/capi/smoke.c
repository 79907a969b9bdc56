/* Drives the C ABI end to end on a checkpoint (argv[1]) and prints what it saw, one fact per
 * line, for tests/capi.rs to compare with the Rust engine. Exit status 1: a call that should
 * have succeeded failed (the message is on stderr). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "r1_runtime.h"

#define CHECK(call)                                                                            \
    do {                                                                                       \
        r1_status st_ = (call);                                                                \
        if (st_ != R1_OK) {                                                                    \
            fprintf(stderr, "%s:%d: %s -> %d: %s\n", __FILE__, __LINE__, #call, (int)st_,      \
                    r1_last_error() ? r1_last_error() : "(no message)");                       \
            return 1;                                                                          \
        }                                                                                      \
    } while (0)

static uint32_t argmax(const float* row, uint64_t n) {
    uint32_t best = 0;
    for (uint64_t i = 1; i < n; i++)
        if (row[i] > row[best]) best = (uint32_t)i;
    return best;
}

int main(int argc, char** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL_DIR\n", argv[0]);
        return 2;
    }
    printf("version %s\n", r1_version());

    r1_engine* missing = (r1_engine*)&argc;
    r1_status st = r1_engine_load("/nonexistent/r1-model", NULL, &missing);
    printf("missing_dir %d %s\n", (int)st, missing == NULL ? "null" : "set");
    printf("missing_dir_message %s\n", r1_last_error() ? r1_last_error() : "(none)");

    r1_engine_options opts;
    CHECK(r1_engine_options_default(&opts));
    opts.with_mtp = 0;
    opts.cache_tokens = 4096;
    r1_engine* e = NULL;
    CHECK(r1_engine_load(argv[1], &opts, &e));
    printf("last_error_after_success %s\n", r1_last_error() == NULL ? "null" : "set");
    r1_model_info info;
    CHECK(r1_engine_info(e, &info));
    printf("info %llu %llu %llu %u %llu\n", (unsigned long long)info.vocab_size,
           (unsigned long long)info.hidden_size, (unsigned long long)info.max_context, info.eos_token_id,
           (unsigned long long)info.page_tokens);
    const uint64_t vocab = info.vocab_size;

    /* Greedy generation in one call. */
    const uint32_t prompt[] = {0, 232, 219, 69, 232, 158, 253, 191};
    const uint64_t prompt_len = sizeof prompt / sizeof prompt[0];
    r1_sampling greedy;
    CHECK(r1_sampling_default(&greedy));
    greedy.ignore_eos = 1;
    uint32_t generated[6];
    uint64_t generated_len = 0;
    CHECK(r1_generate(e, prompt, prompt_len, 6, &greedy, generated, 6, &generated_len));
    printf("generate");
    for (uint64_t i = 0; i < generated_len; i++) printf(" %u", generated[i]);
    printf("\n");

    /* The same, step by step through a sequence; then a fork taken after the prompt decodes
     * beside its parent in one batched step and must see the same logits. */
    float* logits = malloc(2 * vocab * sizeof(float));
    r1_sequence* a = NULL;
    CHECK(r1_sequence_new(e, &a));
    r1_sequence* one[1] = {a};
    const uint32_t* toks[2] = {prompt, NULL};
    uint64_t counts[2] = {prompt_len, 1};
    CHECK(r1_forward(e, one, toks, counts, 1, logits, vocab));
    r1_sequence* b = NULL;
    CHECK(r1_sequence_fork(e, a, prompt_len, &b));
    printf("fork_len %llu\n", (unsigned long long)r1_sequence_len(b));
    uint32_t next = argmax(logits, vocab);
    printf("stepwise %u", next);
    int fork_equal = 1;
    for (int i = 1; i < 6; i++) {
        r1_sequence* both[2] = {a, b};
        const uint32_t* step[2] = {&next, &next};
        uint64_t ones[2] = {1, 1};
        CHECK(r1_forward(e, both, step, ones, 2, logits, 2 * vocab));
        fork_equal &= memcmp(logits, logits + vocab, vocab * sizeof(float)) == 0;
        next = argmax(logits, vocab);
        printf(" %u", next);
    }
    printf("\nfork_equal %d\n", fork_equal);
    printf("seq_len %llu\n", (unsigned long long)r1_sequence_len(a));

    /* Logits of several trailing rows: the prompt's last row equals r1_forward's. */
    float* rows_logits = malloc(3 * vocab * sizeof(float));
    r1_sequence* c = NULL;
    CHECK(r1_sequence_new(e, &c));
    r1_sequence* just_c[1] = {c};
    const uint64_t three[1] = {3};
    CHECK(r1_forward_rows(e, just_c, toks, counts, three, 1, rows_logits, 3 * vocab));
    CHECK(r1_sequence_truncate(e, c, 0));
    CHECK(r1_forward(e, just_c, toks, counts, 1, logits, vocab));
    printf("rows_last_equal %d\n", memcmp(rows_logits + 2 * vocab, logits, vocab * sizeof(float)) == 0);
    const uint64_t zero[1] = {0};
    printf("zero_rows %d\n", (int)r1_forward_rows(e, just_c, toks, counts, zero, 1, rows_logits, 3 * vocab));
    CHECK(r1_sequence_free(e, c));
    free(rows_logits);

    /* Bad calls report errors and change nothing. */
    r1_sequence* twice[2] = {a, a};
    uint64_t ones[2] = {1, 1};
    const uint32_t* step2[2] = {&next, &next};
    printf("duplicate_sequence %d\n", (int)r1_forward(e, twice, step2, ones, 2, logits, 2 * vocab));
    printf("duplicate_sequence_message %s\n", r1_last_error());
    printf("small_buffer %d\n", (int)r1_forward(e, one, step2, ones, 1, logits, vocab - 1));
    const uint32_t bad_token = (uint32_t)vocab;
    const uint32_t* bad[1] = {&bad_token};
    printf("bad_token %d\n", (int)r1_forward(e, one, bad, ones, 1, logits, vocab));
    printf("bad_token_message %s\n", r1_last_error());
    printf("null_engine %d\n", (int)r1_engine_info(NULL, &info));
    printf("seq_len_after_errors %llu\n", (unsigned long long)r1_sequence_len(a));

    CHECK(r1_sequence_truncate(e, a, 3));
    printf("truncated_len %llu\n", (unsigned long long)r1_sequence_len(a));
    CHECK(r1_sequence_free(e, a));
    CHECK(r1_sequence_free(e, b));
    CHECK(r1_engine_info(e, &info));
    printf("pages_in_use %llu\n", (unsigned long long)info.cache_pages_in_use);
    r1_engine_free(e);
    free(logits);
    return 0;
}
