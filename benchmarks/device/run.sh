#!/usr/bin/env bash
# One device session's measurements, by phase (run from the repository root on the GPU machine):
#   bash benchmarks/device/run.sh tests|spread8|prefill1|prefill2|decode8|decode1m|page4|collectives|split8|split1m|sweep|rows8
# Results go to $OUT (and benchmarks/results/); LONGQUEST_GIT_COMMIT names the commit measured.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
case "$1" in
  tests)  # every GPU-marked test
    timeout 560 python -m pytest -q -p no:cacheprovider -m "gpu or multigpu" tests -x -rs 2>&1 | tail -40 ;;
  prefill1)  # exact prefill on one GPU, 128K..512K
    timeout 580 python benchmarks/prefill.py --part 1 --contexts 131072,262144,524288 --out-dir "$out" ;;
  prefill2)  # exact prefill on two GPUs, 512K and 1M
    timeout 580 torchrun --standalone --nproc-per-node 2 benchmarks/prefill.py --part 1 \
      --contexts 524288,1048576 --out-dir "$out" ;;
  decode8)  # batch 8 at the largest context that fits on two GPUs
    timeout 580 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py \
      --contexts 196608 --batches 8 --budgets 2048 --no-sdpa --out-dir "$out" ;;
  decode1m)  # batch 1 at 1M on two GPUs, 16-token pages and 4-token pages
    timeout 290 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py \
      --contexts 1048576 --batches 1 --budgets 2048,4096 --no-sdpa --out-dir "$out"
    timeout 290 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py \
      --contexts 1048576 --batches 1 --budgets 2048,4096 --no-sdpa --page-size 4 --out-dir "$out" ;;
  page4)  # the global top-k at large page counts: 1M on two GPUs in 4-token pages
    timeout 200 python -m pytest -q -p no:cacheprovider tests/kernels/test_global_topk.py 2>&1 | tail -3
    timeout 290 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py \
      --contexts 1048576 --batches 1 --budgets 2048,4096 --no-sdpa --page-size 4 --out-dir "$out" ;;
  collectives)  # small-collective latency in CUDA graphs: NCCL protocols and symmetric memory
    for proto in default LL LL128; do
      if [ "$proto" = default ]; then env=(); else env=(NCCL_PROTO=$proto); fi
      env "${env[@]}" timeout 150 torchrun --standalone --nproc-per-node 2 benchmarks/collectives.py \
        --label "$proto" --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn"
    done ;;
  split8)  # session 4: batch 8 x 192K on two GPUs with the MLP split; bf16 and fp8 bounds
    timeout 170 python -m pytest -q -p no:cacheprovider -m "gpu or multigpu" tests/kernels/test_fp8_bounds.py \
      tests/kernels/test_scores.py tests/kernels/test_quest_step.py tests/engine/test_model.py 2>&1 | tail -3
    for bounds in model float8_e4m3fn; do
      timeout 200 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py --contexts 196608 \
        --batches 8 --budgets 2048 --no-sdpa --bounds-dtype $bounds --label b8-$bounds \
        --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn"
    done ;;
  split1m)  # session 4: batch 1 at 1M on two GPUs with the MLP split, and the multi-GPU tests
    timeout 200 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py --contexts 1048576 \
      --batches 1 --budgets 2048,4096 --no-sdpa --bounds-dtype "${BOUNDS:-model}" --label 1m \
      --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn"
    timeout 250 python -m pytest -q -p no:cacheprovider -m "gpu or multigpu" tests/parallel \
      tests/engine tests/launch 2>&1 | tail -3 ;;
  sweep)  # session 5: one rank's Quest kernels in their candidate forms; prefill 128K on 2 GPUs
    timeout 300 python benchmarks/score_variants.py --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn"
    timeout 250 torchrun --standalone --nproc-per-node 2 benchmarks/prefill.py --part 1 \
      --contexts 131072 --out-dir "$out" 2>&1 | tail -15 ;;
  rows8)  # session 5: fp8 bounds scored as rows; batch 8 at 192K and at 216K (4 GiB reserve)
    timeout 150 python benchmarks/score_variants.py --label weights --out-dir "$out" 2>&1 \
      | grep -v "^W1\|^\[W\|warn" | tail -40
    timeout 120 python -m pytest -q -p no:cacheprovider -m "gpu or multigpu" tests/kernels/test_fp8_bounds.py \
      tests/kernels/test_scores.py tests/kernels/test_quest_step.py 2>&1 | tail -3
    for bounds in float8_e4m3fn model; do
      ctx=221184; [ "$bounds" = float8_e4m3fn ] && ctx=196608,221184
      timeout 240 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py --contexts $ctx \
        --batches 8 --budgets 2048 --no-sdpa --bounds-dtype $bounds --reserve-gib 4 \
        --label b8-rows-$bounds --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn" | tail -12
    done ;;
  peer6)  # session 6: peer-memory collectives: GPU tests, latency, batch 8 x 216K peer vs NCCL
    timeout 200 python -m pytest -q -p no:cacheprovider -m "gpu or multigpu" tests/kernels/test_peer.py \
      tests/parallel/test_peer.py tests/parallel/test_worker.py -x 2>&1 | tail -5 || exit 1
    timeout 100 torchrun --standalone --nproc-per-node 2 benchmarks/collectives.py --label peer \
      --sizes-kb 16,64,132,256 --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn"
    timeout 280 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py --contexts 221184 \
      --batches 8 --budgets 2048 --no-sdpa --bounds-dtype float8_e4m3fn --reserve-gib 4 \
      --collectives peer,nccl --label b8-peer --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn" | tail -8 ;;
  one7)  # session 7, one GPU: kernel tests, a rank's attention and keep forms, Nsight probe
    timeout 200 python -m pytest -q -p no:cacheprovider tests/kernels/test_peer.py \
      tests/kernels/test_global_topk.py -x 2>&1 | tail -3
    timeout 200 python -m pytest -q -p no:cacheprovider -m gpu tests/kernels -x 2>&1 | tail -3
    timeout 200 python benchmarks/score_variants.py --parts attention,keep --label one7 \
      --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn"
    timeout 150 ncu --clock-control none --profile-from-start off --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
      --section LaunchStats python benchmarks/device/ncu_probe.py > "$out/ncu-one7.txt" 2>&1
    tail -5 "$out/ncu-one7.txt" ;;
  one7b)  # session 7, one GPU: loop forms of the fp8 score and attention kernels; Nsight
    timeout 150 python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_decode.py \
      tests/kernels/test_scores.py tests/kernels/test_fp8_bounds.py -x 2>&1 | tail -3
    timeout 300 python benchmarks/score_variants.py --parts scores,attention --bounds float8_e4m3fn \
      --table contiguous --label one7b --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn"
    timeout 120 ncu --clock-control none --profile-from-start off --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
      --section LaunchStats python benchmarks/device/ncu_probe.py > "$out/ncu-one7b.txt" 2>&1
    grep -E "^  _|Duration|DRAM Throughput|Registers Per|Dynamic Shared|Achieved Occ" "$out/ncu-one7b.txt" ;;
  one7c)  # session 7, one GPU: the new defaults (fp8 score form, splits, keep): tests, sweeps
    timeout 200 python -m pytest -q -p no:cacheprovider tests/kernels/test_peer.py \
      tests/kernels/test_global_topk.py -x 2>&1 | tail -3
    timeout 200 python -m pytest -q -p no:cacheprovider -m gpu tests/kernels -x 2>&1 | tail -3
    for table in random contiguous; do
      parts=scores; [ "$table" = random ] && parts=scores,attention,keep
      timeout 200 python benchmarks/score_variants.py --parts $parts --bounds float8_e4m3fn \
        --table $table --label one7c-$table --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn"
    done ;;
  one7d)  # session 7, one GPU: attention's split choice (share, whole list, dense)
    timeout 100 python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_decode.py \
      tests/kernels/test_quest_step.py -x 2>&1 | tail -2
    timeout 200 python benchmarks/score_variants.py --parts attention --label one7d \
      --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn" ;;
  final7)  # session 7, one GPU: every GPU test at the final kernels; attention's splits again
    timeout 420 python -m pytest -q -p no:cacheprovider -m "gpu or multigpu" tests -rs 2>&1 | tail -6
    timeout 60 python -m pytest -q -p no:cacheprovider tests/kernels/test_peer.py 2>&1 | tail -1
    timeout 100 python benchmarks/score_variants.py --parts attention --label final7 \
      --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn" ;;
  fine7)  # session 7, one GPU: the fp8 score form's fine grid; attention's tile and depth
    timeout 250 python benchmarks/score_variants.py --parts scores,attention --bounds float8_e4m3fn \
      --score-forms fine --label fine7 --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn" ;;
  spread8)  # session 8, one GPU: the spread selection's tests, its forms, whole steps A/B
    timeout 240 python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_topk_spread.py \
      tests/kernels/test_topk.py tests/kernels/test_quest_step.py -x 2>&1 | tail -3 || exit 1
    timeout 60 python -m pytest -q -p no:cacheprovider tests/kernels/test_peer.py 2>&1 | tail -1
    timeout 240 python benchmarks/score_variants.py --parts select --label spread8 \
      --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn"
    # One GPU: a rank's local top-k shapes of the two 2-GPU headline rows (32768 pages at
    # batch 1; 8 x 6144 pages at batch 8), the whole step with each selection.
    timeout 200 python benchmarks/decode.py --contexts 524288 --batches 1 --budgets 2048,4096 \
      --no-sdpa --selection spread,two-pass --label spread8-512k --out-dir "$out" 2>&1 \
      | grep "context=\|wrote"
    timeout 200 python benchmarks/decode.py --contexts 98304 --batches 8 --budgets 2048 \
      --no-sdpa --bounds-dtype float8_e4m3fn --selection spread,two-pass --label spread8-b8 \
      --out-dir "$out" 2>&1 | grep "context=\|wrote" ;;
  spread8b)  # session 8, one GPU: the spread selection after its first run: tests, forms at
    # a rank's 1M shape, whole steps A/B at 512K (32768 pages a row) and 128K (8192)
    timeout 200 python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_topk_spread.py \
      tests/kernels/test_topk.py -x 2>&1 | tail -3 || exit 1
    timeout 200 python benchmarks/score_variants.py --parts select --shapes 1x1M-w2 \
      --label spread8b --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn"
    for ctx in 524288 131072; do
      timeout 150 python benchmarks/decode.py --contexts $ctx --batches 1 --budgets 2048,4096 \
        --no-sdpa --selection spread,two-pass --label spread8b-$ctx --out-dir "$out" 2>&1 \
        | grep "context=\|wrote"
    done ;;
  spread8d)  # session 8, one GPU: the final defaults (4-bit digits, parts of >= 512 pages):
    # GPU tests of selection, Quest step and engine; whole steps A/B at 512K and 128K
    timeout 200 python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_topk_spread.py \
      tests/kernels/test_topk.py tests/kernels/test_quest_step.py tests/engine -x 2>&1 | tail -3
    for ctx in 524288 131072; do
      timeout 110 python benchmarks/decode.py --contexts $ctx --batches 1 --budgets 2048,4096 \
        --no-sdpa --selection spread,two-pass --label spread8d-$ctx --out-dir "$out" 2>&1 \
        | grep "context=\|wrote"
    done ;;
  ll6)  # session 6: the peer kernel with flags in the words (LL): tests, latency, batch 8 x 216K
    timeout 60 python -m pytest -q -p no:cacheprovider tests/kernels/test_peer.py -x 2>&1 | tail -3 || exit 1
    timeout 200 python -m pytest -q -p no:cacheprovider -m "gpu or multigpu" tests/parallel/test_peer.py \
      tests/parallel/test_worker.py -x 2>&1 | tail -5 || exit 1
    timeout 100 torchrun --standalone --nproc-per-node 2 benchmarks/collectives.py --label ll \
      --sizes-kb 16,64,132,256 --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn\|return func"
    timeout 250 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py --contexts 221184 \
      --batches 8 --budgets 2048 --no-sdpa --bounds-dtype float8_e4m3fn --reserve-gib 4 \
      --collectives ${KINDS:-peer} --label b8-ll --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn" | tail -8 ;;
  tests6)  # session 6: every GPU test, and the peer kernel's own on the GPU
    timeout 480 python -m pytest -q -p no:cacheprovider -m "gpu or multigpu" tests -x 2>&1 | tail -4
    timeout 60 python -m pytest -q -p no:cacheprovider tests/kernels/test_peer.py -x 2>&1 | tail -2 ;;
  review6)  # session 6: the peer kernel after review mends: its tests; batch 8 x 216K
    timeout 60 python -m pytest -q -p no:cacheprovider tests/kernels/test_peer.py -x 2>&1 | tail -2
    timeout 200 python -m pytest -q -p no:cacheprovider -m "gpu or multigpu" tests/parallel/test_peer.py \
      tests/parallel/test_worker.py -x 2>&1 | tail -2 || exit 1
    timeout 150 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py --contexts 221184 \
      --batches 8 --budgets 2048 --no-sdpa --bounds-dtype float8_e4m3fn --reserve-gib 4 \
      --label b8-review6 --out-dir "$out" 2>&1 | grep "context=\|wrote" ;;
  final6)  # session 6: batch 8 x 216K (PDL off, on); 1M at batch 1
    for pdl in "" "--pdl"; do
      timeout 150 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py --contexts 221184 \
        --batches 8 --budgets 2048 --no-sdpa --bounds-dtype float8_e4m3fn --reserve-gib 4 $pdl \
        --label b8-final6$pdl --out-dir "$out" 2>&1 | grep "context=\|wrote"
    done
    timeout 120 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py --contexts 1048576 \
      --batches 1 --budgets 2048,4096 --no-sdpa --label 1m-final6 --out-dir "$out" 2>&1 \
      | grep "context=\|wrote" ;;
  profile8)  # session 5: the captured step's kernels by kind, batch 8 x 216K, fp8 bounds
    timeout 300 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py --contexts 221184 \
      --batches 8 --budgets 2048 --no-sdpa --bounds-dtype float8_e4m3fn --reserve-gib 4 --profile \
      --label b8-profile --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn" | tail -12 ;;
  attn)  # session 5: the sparse attention's split balance and the keep step, one rank
    timeout 120 python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_decode.py \
      tests/kernels/test_quest_step.py tests/kernels/test_global_topk.py 2>&1 | tail -3
    timeout 200 python benchmarks/score_variants.py --parts attention,keep,select --label attn2 \
      --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn" | tail -40 ;;
  final5)  # session 5: the final code: batch 8 at 216K (fp8 and bf16 bounds), 1M at batch 1
    for bounds in float8_e4m3fn model; do
      timeout 200 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py --contexts 221184 \
        --batches 8 --budgets 2048 --no-sdpa --bounds-dtype $bounds --reserve-gib 4 \
        --label b8-final-$bounds --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn" | tail -4
    done
    timeout 180 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py --contexts 1048576 \
      --batches 1 --budgets 2048,4096 --no-sdpa --label 1m-final --out-dir "$out" 2>&1 \
      | grep -v "^W1\|^\[W\|warn" | tail -5 ;;
  fewer)  # session 5: fewer kernels a layer (partial states packed, splits reduced in place)
    timeout 150 python -m pytest -q -p no:cacheprovider -m "gpu or multigpu" tests/kernels/test_decode.py \
      tests/kernels/test_merge.py tests/parallel tests/engine/test_cuda_graphs.py 2>&1 | tail -3
    timeout 200 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py --contexts 221184 \
      --batches 8 --budgets 2048 --no-sdpa --bounds-dtype float8_e4m3fn --reserve-gib 4 --profile \
      --label b8-fewer-float8_e4m3fn --out-dir "$out" 2>&1 | grep -v "^W1\|^\[W\|warn" | tail -6 ;;
  last5)  # session 5, final code: batch 8 x 216K in bf16 bounds, 1M at batch 1, every GPU test
    timeout 150 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py --contexts 221184 \
      --batches 8 --budgets 2048 --no-sdpa --reserve-gib 4 --label b8-fewer-model --out-dir "$out" \
      2>&1 | grep -v "^W1\|^\[W\|warn" | tail -3
    timeout 150 torchrun --standalone --nproc-per-node 2 benchmarks/decode.py --contexts 1048576 \
      --batches 1 --budgets 2048,4096 --no-sdpa --label 1m-fewer --out-dir "$out" 2>&1 \
      | grep -v "^W1\|^\[W\|warn" | tail -4
    timeout 250 python -m pytest -q -p no:cacheprovider -m "gpu or multigpu" tests -rs 2>&1 | tail -4 ;;
esac
