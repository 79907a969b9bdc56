/*
 * Launch-parameter structs shared by the CUDA kernels (the .cu files in cuda/) and Rust
 * (build.rs runs bindgen on this file and writes $OUT_DIR/launch_params.rs). Plain C:
 * fixed-width types, device pointers as unsigned long long, no CUDA headers. Every kernel is
 * `extern "C" __global__` and takes exactly one of these structs by value.
 *
 * One header per kernel family, gathered here so that kernels and bindgen read one file:
 *   params/common.h      conventions, SA / weight-scale layouts, w8a8 numerics, R1TensorMap,
 *                        register-reallocation budgets
 *   params/act_quant.h   act_quant
 *   params/fp8_gemm.h    fp8_gemm_ref, fp8_gemm_wgmma(_m64)
 *   params/bf16_gemm.h   bf16_gemm_wgmma
 *   params/mla.h         the MLA kernels (cuda/mla/)
 *   params/moe.h         the MoE kernels (cuda/moe.cu, cuda/moe_gemm.cu)
 *   params/small_ops.h   the small graph ops
 *   params/sampling.h    token sampling
 *   params/probe.h       the layout probes
 *   params/random_fill.h random_fill (synthetic weights)
 */
#ifndef R1_LAUNCH_PARAMS_H
#define R1_LAUNCH_PARAMS_H

#include "params/common.h"
#include "params/act_quant.h"
#include "params/fp8_gemm.h"
#include "params/bf16_gemm.h"
#include "params/mla.h"
#include "params/moe.h"
#include "params/small_ops.h"
#include "params/sampling.h"
#include "params/probe.h"
#include "params/random_fill.h"

#endif /* R1_LAUNCH_PARAMS_H */
