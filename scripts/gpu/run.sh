#!/usr/bin/env bash
# GPU validation kit, step 2 (the run step, on the GPU machine, after scripts/gpu/setup.sh):
#   scripts/gpu/run.sh [tests] [trainer] [checkpoint] [bench] [bench_8b] [profile] [moe] [bench_moe]
#   (none named: all eight)
# Writes every log and table under $OUT (default ./gpu_out) and prints the tables last; exits
# non-zero when a stage fails. Stages (minutes on one H100, to fit a 10-minute command limit:
# run `tests trainer checkpoint bench` in one command, `bench_8b profile` in a second, `moe bench_moe`
# in a third):
#   tests       test_titan on CUDA with 1 rank over NCCL and 2 ranks on the one GPU over Gloo;
#               test_models (transformers parity from the carried references), test_models_ranks
#               (1 rank NCCL, 2 ranks Gloo);
#               test_trainer (single-process cases; the multirank suite on 2 Gloo ranks)
#   trainer     scripts/gpu/check_trainer.py: fp32 CUDA vs CPU, bf16 with each AC mode, async
#               checkpoint and resume, PP 2 and CP 2 on the shared GPU, float8 vs bf16 tokens/s
#   checkpoint  bench/checkpoint/run.sh on CUDA tensors: dd, titan's bench_checkpoint and PyTorch DCP on
#               a 1B-parameter fp32 state (save, async save blocked time, load)
# GPU_KIT_STAGE_LIMIT=S caps every stage at S seconds; SIDE_BY_SIDE_ARGS adds options to run.py
# (e.g. "--impls titan,fsdp2 --steps 10").
#   bench       bench/side_by_side/run.py --device cuda: titan vs FSDP2 (eager, compiled) and
#               torchtitan on Llama 3 1B, seq 8192, bf16
#   bench_8b    the same on Llama 3 8B's shape with 8 layers (--shape 8B: fills the GPU for the MFU
#               figure): titan, titan_kernels, titan_fused, torchtitan and torchtitan + compile
#   profile     the titan, titan_kernels and titan_fused rows of the benchmark for 10 steps with step 8 profiled
#               ([profiling]), summarised by scripts/gpu/profile_report.py: top kernels, GPU idle
#               share, the SDPA backend, the runtime cuDNN version, allocator retries
#   moe         bench/moe/bench_moe in bf16: Mixtral 8x7B's expert shapes on 1 rank (grouped GEMM, loop and
#               the same FLOPs as dense mm, TFLOP/s each), and the MoE layer at EP 1 and EP 2 on the
#               shared GPU (2 Gloo ranks)
#   bench_moe   bench/side_by_side/run.py --device cuda --model qwen3_moe: titan (ATen path, CUDA
#               kernels, fused projections) vs torchtitan's Qwen3-MoE (eager, compiled) on
#               Qwen3-30B-A3B's blocks with 4 layers, seq 8192, bf16 (the cost model's gpu_moe)
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

stages=("$@")
((${#stages[@]})) || stages=(tests trainer checkpoint bench bench_8b profile moe bench_moe)
summary="$out/summary.md"
: > "$summary"
failed=0

# run NAME TIMEOUT ENV... -- COMMAND...: logs to $out/NAME.log, one summary line.
run() {
  local name=$1 limit=$2
  shift 2
  ((limit <= ${GPU_KIT_STAGE_LIMIT:-$limit})) || limit=$GPU_KIT_STAGE_LIMIT
  local vars=()
  while [[ $1 != -- ]]; do vars+=("$1"); shift; done
  shift
  local started=$SECONDS
  env "${vars[@]}" timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local result
  result=$(grep -h -E '^(\[rank 0\] )?\[doctest\] (test cases|assertions)' "$out/$name.log" | sed 's/^\[rank 0\] //' |
    tr '\n' ' ')
  printf '| %s | %s | %ss | %s |\n' "$name" "$([[ $rc == 0 ]] && echo pass || echo "FAIL ($rc)")" \
    "$((SECONDS - started))" "${result:-see $name.log}" | tee -a "$summary" >&2
  [[ $rc == 0 ]] || failed=1
}

cuda=(TITAN_TEST_DEVICE=cuda)  # the test main sets TITAN_DEVICE and TITAN_SHARE_GPUS to match
references=(TITAN_FLOAT8_REFERENCE="$kit/float8_reference.safetensors"
            TITAN_MOE_REFERENCE="$kit/moe_reference.safetensors")  # test_titan's parity references
launch="$kit_build/tests/titan_launch"
for stage in "${stages[@]}"; do
  case "$stage" in
    tests)
      run titan_1rank_nccl 300 "${cuda[@]}" "${references[@]}" TITAN_BACKEND=nccl -- \
        "$launch" --nproc 1 -- "$kit_build/tests/test_titan"
      run titan_2ranks_gloo_cuda 300 "${cuda[@]}" "${references[@]}" TITAN_BACKEND=gloo -- \
        "$launch" --nproc 2 -- "$kit_build/tests/test_titan"
      run models_cuda 300 "${cuda[@]}" TITAN_MODELS_REFERENCE="$kit/models_reference" \
        TITAN_MODELS_SCRATCH="$out/models_scratch" -- "$kit_build/tests/models/test_models"
      run models_ranks_1rank_nccl 300 "${cuda[@]}" TITAN_BACKEND=nccl TITAN_MODELS_SCRATCH="$out/models_scratch" -- \
        "$launch" --nproc 1 -- "$kit_build/tests/models/test_models_ranks"
      run models_ranks_2ranks_gloo_cuda 300 "${cuda[@]}" TITAN_BACKEND=gloo \
        TITAN_MODELS_SCRATCH="$out/models_scratch" -- "$launch" --nproc 2 -- "$kit_build/tests/models/test_models_ranks"
      run trainer_unit_cuda 300 "${cuda[@]}" TITAN_BACKEND=nccl -- \
        "$launch" --nproc 1 -- "$kit_build/tests/trainer/test_trainer" -tse=multirank
      run trainer_2ranks_gloo_cuda 300 "${cuda[@]}" TITAN_BACKEND=gloo -- \
        "$launch" --nproc 2 -- "$kit_build/tests/trainer/test_trainer" -ts=multirank
      ;;
    trainer)
      run trainer_checks 540 -- "$python" "$root/scripts/gpu/check_trainer.py" --build "$kit_build" --out "$out/trainer"
      ;;
    checkpoint)
      run checkpoint_bench 300 TITAN_DEVICE=cuda TITAN_BACKEND=nccl BUILD_DIR="$kit_build" -- \
        "$root/bench/checkpoint/run.sh" --dir "$out/ckpt_bench"
      rm -rf "$out/ckpt_bench"
      ;;
    bench)
      run side_by_side 570 -- "$python" "$root/bench/side_by_side/run.py" --device cuda --build "$kit_build" \
        --python "$python" --torchtitan-site "$kit_site" --out "$out/side_by_side" --timeout 240 ${SIDE_BY_SIDE_ARGS:-}
      ;;
    bench_8b)
      run side_by_side_8b 420 -- "$python" "$root/bench/side_by_side/run.py" --device cuda --shape 8B \
        --build "$kit_build" --python "$python" --torchtitan-site "$kit_site" --out "$out/side_by_side_8b" \
        --impls titan,titan_kernels,titan_fused,torchtitan,torchtitan_compile --timeout 200
      ;;
    profile)
      run profile 420 -- "$python" "$root/bench/side_by_side/run.py" --device cuda --build "$kit_build" \
        --python "$python" --out "$out/profile" --impls titan,titan_kernels,titan_fused \
        --warmup 5 --steps 5 --timeout 200 \
        --titan-set profiling.enable_profiling=true --titan-set profiling.profile_freq=8
      "$python" "$root/scripts/gpu/profile_report.py" "$out"/profile/titan*/profile_trace/iteration_8/rank0_trace.json \
        > "$out/profile/report.md" 2>&1 || failed=1
      ;;
    moe)
      run moe_bench_mixtral_shapes 240 TITAN_DEVICE=cuda TITAN_BACKEND=nccl -- "$launch" --nproc 1 -- \
        "$kit_build/bench/moe/bench_moe" --tokens 4096 --dim 4096 --hidden 14336 --experts 8 --top-k 2
      run moe_bench_ep2_shared_gpu 240 TITAN_DEVICE=cuda TITAN_BACKEND=gloo TITAN_SHARE_GPUS=1 -- \
        "$launch" --nproc 2 -- "$kit_build/bench/moe/bench_moe" --tokens 4096 --dim 1024 --hidden 2048
      ;;
    bench_moe)
      run side_by_side_moe 480 -- "$python" "$root/bench/side_by_side/run.py" --device cuda --model qwen3_moe \
        --build "$kit_build" --python "$python" --torchtitan-site "$kit_site" --out "$out/side_by_side_moe" \
        --warmup 5 --steps 10 --timeout 180
      ;;
    *) die "unknown stage '$stage' (expected tests, trainer, checkpoint, bench, bench_8b, profile, moe or bench_moe)" ;;
  esac
done

{
  echo
  echo "GPU validation kit, $(date -u +%Y-%m-%d), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(head -1 "$kit/MANIFEST")"
  echo "| stage | result | time | doctest |"
  echo "|---|---|---|---|"
  cat "$summary"
  for table in "$out/trainer/table.md" "$out/checkpoint_bench.log" "$out/side_by_side/table.md" \
    "$out/side_by_side_8b/table.md" "$out/side_by_side_moe/table.md"; do
    [[ -f "$table" ]] && { echo; grep -h '^\(\[rank 0\] \)\?|\|^side by side' "$table" | sed 's/^\[rank 0\] //'; }
  done
  [[ -f "$out/profile/report.md" ]] && { echo; cat "$out/profile/report.md"; }
} | tee "$out/report.md"
exit "$failed"
