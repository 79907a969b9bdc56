// MLA split-KV tile scheduler (mla_schedule): balances the key blocks of sequences of varying
// length over the SMs for the wgmma decode (cuda/mla/decode.cu), which reads its output.
// Contract (outputs, grid, block): cuda/params/mla.h.
#include <cuda_bf16.h>
#include <stdint.h>

#include "params/mla.h"
#include "mla/common.cuh"

using namespace r1::mla;

// One thread walks the sequences (their block counts staged in shared memory by the warp):
// every part gets `payload` block-equivalents, a sequence costing its blocks plus a fixed
// overhead each time a part starts (or resumes) it. See cuda/params/mla.h for the outputs; the
// host mirror (`mla_schedule_host`) is the same loop, and the host tests check that every block
// of every sequence is covered exactly once.

extern "C" __global__ void __launch_bounds__(32) mla_schedule(const R1MlaScheduleParams p) {
    __shared__ int nblk[R1_MLA_SCHED_MAX_BATCH];
    const int lane = threadIdx.x;
    const int batch = min(p.batch, R1_MLA_SCHED_MAX_BATCH);
    const int* seqlens = reinterpret_cast<const int*>(p.seqlens_k);
    for (int b = lane; b < batch; b += 32) nblk[b] = (kv_len_of(seqlens, b, p.bt_stride) + PAGE - 1) / PAGE;
    __syncwarp();
    if (lane != 0) return;

    const int64_t overhead = p.fixed_overhead;
    int64_t total = 0;
    for (int b = 0; b < batch; b++) total += nblk[b] + overhead;
    const int64_t parts = max(p.num_parts, 1);
    const int64_t payload = (total + parts - 1) / parts + overhead;

    int* sched = reinterpret_cast<int*>(p.sched);
    int* splits = reinterpret_cast<int*>(p.splits);
    splits[0] = 0;
    int cur_b = 0, cur_blk = 0, cur_split = 0, cum = 0;
    for (int part = 0; part < parts; part++) {
        int* out = sched + part * R1_MLA_SCHED_FIELDS;
        out[0] = cur_b;
        out[1] = cur_blk;
        out[4] = cur_split;
        out[5] = 0;
        out[6] = 0;
        out[7] = 0;
        int64_t remain = payload;
        while (cur_b < batch) {
            const int left = nblk[cur_b] - cur_blk;
            if (remain >= left + overhead) {  // the rest of cur_b fits in this part
                cum += cur_split + 1;
                splits[cur_b + 1] = cum;
                remain -= left + overhead;
                cur_b++;
                cur_blk = 0;
                cur_split = 0;
            } else {  // take what fits; the next part resumes cur_b with the next split index
                const int64_t take = remain - overhead;
                if (take > 0) {
                    cur_blk += static_cast<int>(take);
                    cur_split++;
                }
                break;
            }
        }
        if (cur_blk > 0) {
            out[2] = cur_b;
            out[3] = cur_blk;
        } else {
            out[2] = cur_b - 1;
            out[3] = cur_b > 0 ? nblk[cur_b - 1] : 0;
        }
    }
    // Never reached when the payload covers every sequence (it always does); keeps `splits`
    // well formed regardless.
    for (; cur_b < batch; cur_b++) {
        cum += cur_split + 1;
        cur_split = 0;
        splits[cur_b + 1] = cum;
    }
}
