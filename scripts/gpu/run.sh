#!/usr/bin/env bash
# GPU validation kit, step 2 (the run step, on the GPU machine, after scripts/gpu/setup.sh):
#   scripts/gpu/run.sh [--plan] [STAGE ...]    (no stage named: every stage, in the order below)
# Writes every log and table under $OUT (default ./gpu_out) and prints the tables last; exits
# non-zero when a stage fails. The stages, in the order the open GPU issue needs their figures
# (a device lease is 15 minutes: what comes first is what a short lease measures):
#   kernels     titan's CUDA kernels on 1 rank over NCCL: test_titan's fused-operator, adamw_copy_,
#               one-rank keep_compute_copy and MoE-layer cases (the first GPU run of the kernels)
#   bench       bench/side_by_side/run.py --device cuda: titan (ATen path, CUDA kernels, fused
#               projections, float8) vs FSDP2 (eager, compiled) and torchtitan (eager, compiled) on
#               Llama 3 1B, seq 8192, bf16
#   profile     the titan and titan_fused rows of the benchmark for 10 steps with step 8 profiled
#               ([profiling]), summarised by scripts/gpu/profile_report.py: top kernels, GPU idle
#               share, the SDPA backend, the runtime cuDNN version, allocator retries
#   bench_8b    the benchmark on Llama 3 8B's shape with 8 layers (--shape 8B: fills the GPU for the
#               MFU figure, and where float8 gains): titan_kernels, titan_fused, titan_float8 and
#               torchtitan + compile
#   bench_moe   bench/side_by_side/run.py --device cuda --model qwen3_moe: titan (ATen path; CUDA
#               kernels and fused projections) vs torchtitan's Qwen3-MoE (eager, compiled) on
#               Qwen3-30B-A3B's blocks with 4 layers, seq 8192, bf16 (the cost model's gpu_moe)
#   trainer     scripts/gpu/check_trainer.py: fp32 CUDA vs CPU, bf16 with each AC mode and with
#               titan's kernels, async checkpoint and resume, PP 2 and CP 2 on the shared GPU, MoE
#               EP/TP/ETP on the shared GPU, determinism, float8 vs bf16 tokens/s
#   tests       every suite on CUDA: test_titan with 1 rank over NCCL and 2 ranks on the one GPU
#               over Gloo; test_models (transformers parity from the carried references),
#               test_models_ranks (1 rank NCCL, 2 ranks Gloo); test_trainer (single-process cases;
#               the multirank suite on 2 Gloo ranks)
#   moe         bench/moe/bench_moe in bf16: Mixtral 8x7B's expert shapes on 1 rank (grouped GEMM,
#               loop and the same FLOPs as dense mm, TFLOP/s each), and the MoE layer at EP 1 and
#               EP 2 on the shared GPU (2 Gloo ranks)
#   checkpoint  bench/checkpoint/run.sh on CUDA tensors: dd, titan's bench_checkpoint and PyTorch DCP
#               on a 1B-parameter fp32 state (save, async save blocked time, load)
# GPU_KIT_DEADLINE=S: the run ends within S seconds of its start: a stage starts only if its
# estimate (ESTIMATE below) fits in what is left, else it is listed as skipped (a later, shorter
# stage may still run), and no command runs past the deadline. The report ends with the command
# that runs the skipped stages (a second call). --plan prints which stages would run, from the
# estimates, and runs nothing. GPU_KIT_STAGE_LIMIT=S caps every command at S seconds;
# SIDE_BY_SIDE_ARGS adds options to the bench stage's run.py (e.g. "--impls titan,fsdp2 --steps 10").
set -uo pipefail

ORDER=(kernels bench profile bench_8b bench_moe trainer tests moe checkpoint)
# Seconds each stage takes on one H200, to plan a lease: tests, trainer, checkpoint and bench
# measured 64, 38, 55 and 139 s on 2026-11-26 (since then tests and trainer have more cases, bench
# three more rows); the others are estimates from their rows (~25 s a titan row, ~60 s more to
# compile). Replace them with the times of the next kit run (summary.md).
declare -A ESTIMATE=([kernels]=45 [bench]=240 [profile]=80 [bench_8b]=170 [bench_moe]=180 [trainer]=200
                     [tests]=120 [moe]=60 [checkpoint]=70)

plan_only=0
if [[ ${1:-} == --plan ]]; then
  plan_only=1
  shift
fi
stages=("$@")
((${#stages[@]})) || stages=("${ORDER[@]}")
for stage in "${stages[@]}"; do
  [[ -v "ESTIMATE[$stage]" ]] || {
    echo "[gpu] error: unknown stage '$stage' (expected one of: ${ORDER[*]})" >&2
    exit 2
  }
done
deadline=${GPU_KIT_DEADLINE:-0}  # 0: none
[[ $deadline =~ ^[0-9]+$ ]] || { echo "[gpu] error: GPU_KIT_DEADLINE='$deadline': expected seconds" >&2; exit 2; }

# fits STAGE ELAPSED: whether STAGE's estimate fits before the deadline, ELAPSED seconds into the run.
fits() { ((deadline == 0 || ${ESTIMATE[$1]} <= deadline - $2)); }
skipped=()

if ((plan_only)); then
  elapsed=0
  for stage in "${stages[@]}"; do
    if fits "$stage" "$elapsed"; then
      echo "run   $stage (~${ESTIMATE[$stage]} s, from ${elapsed} s)"
      elapsed=$((elapsed + ESTIMATE[$stage]))
    else
      echo "skip  $stage (~${ESTIMATE[$stage]} s; $((deadline - elapsed)) s left)"
      skipped+=("$stage")
    fi
  done
  echo "total ~${elapsed} s$( ((deadline == 0)) || echo " of GPU_KIT_DEADLINE=$deadline")"
  ((${#skipped[@]} == 0)) || echo "next: scripts/gpu/run.sh ${skipped[*]}"
  exit 0
fi

source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
summary="$out/summary.md"
: > "$summary"
failed=0

# run NAME TIMEOUT ENV... -- COMMAND...: logs to $out/NAME.log, one summary line. TIMEOUT is cut to
# GPU_KIT_STAGE_LIMIT and to the time left before the deadline.
run() {
  local name=$1 limit=$2
  shift 2
  ((limit <= ${GPU_KIT_STAGE_LIMIT:-$limit})) || limit=$GPU_KIT_STAGE_LIMIT
  local left=$((deadline - SECONDS > 1 ? deadline - SECONDS : 1))
  ((deadline == 0 || limit <= left)) || limit=$left
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
# side_by_side NAME TIMEOUT OPTIONS...: bench/side_by_side/run.py on the GPU, its table in $out/NAME.
side_by_side() {
  local name=$1 limit=$2
  shift 2
  run "$name" "$limit" -- "$python" "$root/bench/side_by_side/run.py" --device cuda --build "$kit_build" \
    --python "$python" --torchtitan-site "$kit_site" --out "$out/$name" "$@"
}
stage_times=()
for stage in "${stages[@]}"; do
  if ! fits "$stage" "$SECONDS"; then
    skipped+=("$stage")
    printf '| %s | skipped: needs ~%s s, %s s left | | |\n' "$stage" "${ESTIMATE[$stage]}" \
      "$((deadline - SECONDS))" | tee -a "$summary" >&2
    continue
  fi
  stage_started=$SECONDS
  case "$stage" in
    kernels)
      run kernels_1rank_nccl 240 "${cuda[@]}" "${references[@]}" TITAN_BACKEND=nccl -- \
        "$launch" --nproc 1 -- "$kit_build/tests/test_titan" \
        "--test-case=fused*,adamw_copy_*,fsdp: keep_compute_copy*,moe*,float8*"
      ;;
    bench)
      # shellcheck disable=SC2086  # SIDE_BY_SIDE_ARGS is a list of options
      side_by_side side_by_side 570 --timeout 240 ${SIDE_BY_SIDE_ARGS:-}
      ;;
    profile)
      side_by_side profile 420 --impls titan,titan_fused --warmup 5 --steps 5 --timeout 200 \
        --titan-set profiling.enable_profiling=true --titan-set profiling.profile_freq=8
      "$python" "$root/scripts/gpu/profile_report.py" "$out"/profile/titan*/profile_trace/iteration_8/rank0_trace.json \
        > "$out/profile/report.md" 2>&1 || failed=1
      ;;
    bench_8b)
      side_by_side side_by_side_8b 420 --shape 8B --impls titan_kernels,titan_fused,titan_float8,torchtitan_compile \
        --timeout 200
      ;;
    bench_moe)
      side_by_side side_by_side_moe 480 --model qwen3_moe \
        --impls titan,titan_fused,torchtitan_moe,torchtitan_moe_compile --warmup 5 --steps 10 --timeout 180
      ;;
    trainer)
      run trainer_checks 540 -- "$python" "$root/scripts/gpu/check_trainer.py" --build "$kit_build" --out "$out/trainer"
      ;;
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
    moe)
      run moe_bench_mixtral_shapes 240 TITAN_DEVICE=cuda TITAN_BACKEND=nccl -- "$launch" --nproc 1 -- \
        "$kit_build/bench/moe/bench_moe" --tokens 4096 --dim 4096 --hidden 14336 --experts 8 --top-k 2
      run moe_bench_ep2_shared_gpu 240 TITAN_DEVICE=cuda TITAN_BACKEND=gloo TITAN_SHARE_GPUS=1 -- \
        "$launch" --nproc 2 -- "$kit_build/bench/moe/bench_moe" --tokens 4096 --dim 1024 --hidden 2048
      ;;
    checkpoint)
      run checkpoint_bench 300 TITAN_DEVICE=cuda TITAN_BACKEND=nccl BUILD_DIR="$kit_build" -- \
        "$root/bench/checkpoint/run.sh" --dir "$out/ckpt_bench"
      rm -rf "$out/ckpt_bench"
      ;;
  esac
  stage_times+=("$stage $((SECONDS - stage_started)) s")
done

{
  echo
  echo "GPU validation kit, $(date -u +%Y-%m-%d), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(head -1 "$kit/MANIFEST")"
  echo "| stage | result | time | doctest |"
  echo "|---|---|---|---|"
  cat "$summary"
  echo
  echo "Stage times (ESTIMATE in scripts/gpu/run.sh plans with them): $(printf '%s; ' "${stage_times[@]}")"
  ((${#skipped[@]} == 0)) ||
    echo "Skipped for GPU_KIT_DEADLINE=$deadline: ${skipped[*]}. next: scripts/gpu/run.sh ${skipped[*]}"
  for table in "$out/trainer/table.md" "$out/checkpoint_bench.log" "$out/side_by_side/table.md" \
    "$out/side_by_side_8b/table.md" "$out/side_by_side_moe/table.md"; do
    [[ -f "$table" ]] && { echo; grep -h '^\(\[rank 0\] \)\?|\|^side by side' "$table" | sed 's/^\[rank 0\] //'; }
  done
  [[ -f "$out/profile/report.md" ]] && { echo; cat "$out/profile/report.md"; }
} | tee "$out/report.md"
exit "$failed"
