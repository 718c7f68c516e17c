#!/usr/bin/env bash
# Measurements for a GPU session, one phase a call (run from the repository root on the GPU
# machine; each phase stays under 10 minutes):
#
#   bash benchmarks/device/run.sh PHASE
#
#   tests           every GPU-marked test (gpu and multigpu markers; multigpu ones need 2+ GPUs)
#   decode-one-gpu  1 GPU: 128K and 512K, batch 1, Quest 2048/4096, dense, SDPA (the README's
#                   one-GPU rows; BASE=DIR times an earlier tree's rows in the same call)
#   decode-two-gpu  2 GPUs: 1M at batch 1 (Quest 2048/4096, dense), then batch 8 at 216K,
#                   about the largest batch-8 context that fits, with fp8 key bounds
#   decode-four-gpu 4 GPUs: 256K and 1M at batches 1 and 8, 3M at batch 1
#   prefill         exact chunked prefill on $WORLD GPUs (1, 2 or 4; default 1), contexts
#                   from $CONTEXTS (default per world size, sized to fit the time limit)
#   collectives     2 GPUs: small all-gather / all-reduce latency in CUDA graphs, peer
#                   memory against NCCL
#   sp-check        2 GPUs: sequence-parallel equivalence with one GPU, and a context
#                   past one GPU's memory
#   job             1 GPU: the long-document QA job (2 documents x 16 questions at 64K,
#                   64-token answers): prefix caching on, off, and transformers on a subset
#   job-distinct    1 GPU: 32 distinct 32K prompts, prefix caching on against off (ABBA)
#   job-prefill     1 GPU: one 64K and one 128K prefill, the engine at chunks 8K/16K/32K
#                   against one transformers forward, with MFU
#
# Results are JSON under $OUT (default benchmarks/results/); $LABEL, if set, is added to
# the decode and job files' names (e.g. LABEL=before). LONGQUEST_GIT_COMMIT names the commit
# measured where the device's copy has no .git. NVLink multicast stays off on every
# multi-GPU run (the exports below), as the lent multi-GPU hosts require.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-benchmarks/results}
label=${LABEL:+-$LABEL}
quiet() { grep -v "^W1\|^\[W\|warn\|return func"; }
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
case "${1:-}" in
  tests)
    timeout 580 python -m pytest -q -p no:cacheprovider -m "gpu or multigpu" tests -rs 2>&1 \
      | tail -40 ;;
  decode-one-gpu)
    # With BASE=DIR (an export of an earlier commit, its id in BASE_COMMIT), each context is
    # timed on that tree, then on this one, in the same call.
    for ctx in 131072 524288; do
      if [ -n "${BASE:-}" ]; then
        LONGQUEST_GIT_COMMIT=${BASE_COMMIT:-base} timeout 280 python "$BASE/benchmarks/decode.py" \
          --contexts $ctx --batches 1 --budgets 2048,4096 --label "one-gpu-base$label-$ctx" \
          --out-dir "$out" 2>&1 | quiet | grep "context=\|wrote"
      fi
      timeout 280 python benchmarks/decode.py --contexts $ctx --batches 1 --budgets 2048,4096 \
        --label "one-gpu$label-$ctx" --out-dir "$out" 2>&1 | quiet | grep "context=\|wrote"
    done ;;
  decode-two-gpu)
    timeout 280 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py \
      --contexts 1048576 --batches 1 --budgets 2048,4096 --no-sdpa \
      --label "1m$label" --out-dir "$out" 2>&1 | quiet
    timeout 280 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py \
      --contexts 221184 --batches 8 --budgets 2048 --no-sdpa --bounds-dtype float8_e4m3fn \
      --reserve-gib 4 --label "b8$label" --out-dir "$out" 2>&1 | quiet ;;
  decode-four-gpu)
    timeout 580 torchrun --standalone --nproc-per-node 4 benchmarks/decode.py \
      --contexts 262144,1048576,3145728 --batches 1,8 --budgets 2048,4096 --no-sdpa \
      --label "four-gpu$label" --out-dir "$out" 2>&1 | quiet ;;
  prefill)
    world=${WORLD:-1}
    case "$world" in
      1) contexts=${CONTEXTS:-131072,262144,524288} ;;
      2) contexts=${CONTEXTS:-524288,1048576} ;;
      4) contexts=${CONTEXTS:-131072,262144,524288,1048576} ;;
      *) echo "WORLD must be 1, 2 or 4, got $world" >&2; exit 2 ;;
    esac
    launch=(torchrun --standalone --nproc-per-node "$world"); [ "$world" = 1 ] && launch=(python)
    timeout 580 "${launch[@]}" benchmarks/prefill.py --part 1 --contexts "$contexts" \
      --out-dir "$out" 2>&1 | quiet ;;
  collectives)
    timeout 200 torchrun --standalone --nproc-per-node 2 benchmarks/collectives.py \
      --label "peer$label" --out-dir "$out" 2>&1 | quiet ;;
  sp-check)
    timeout 580 torchrun --standalone --nproc-per-node 2 benchmarks/sp_check.py \
      --out-dir "$out" 2>&1 | quiet ;;
  job)
    timeout 580 python benchmarks/batch_job.py --out-dir "$out" ${LABEL:+--label "$LABEL"} \
      2>&1 | quiet ;;
  job-distinct)
    timeout 580 python benchmarks/batch_job.py --distinct 32 --context 32768 --out-dir "$out" \
      ${LABEL:+--label "$LABEL"} 2>&1 | quiet ;;
  job-prefill)
    timeout 580 python benchmarks/batch_job.py --prefill-only --contexts 65536 131072 \
      --out-dir "$out" ${LABEL:+--label "$LABEL"} 2>&1 | quiet ;;
  *)
    echo "usage: bash benchmarks/device/run.sh tests|decode-one-gpu|decode-two-gpu|decode-four-gpu|prefill|collectives|sp-check|job|job-distinct|job-prefill" >&2
    exit 2 ;;
esac
