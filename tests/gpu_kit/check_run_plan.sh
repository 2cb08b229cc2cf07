#!/usr/bin/env bash
# The GPU kit's lease plan (scripts/gpu/run.sh --plan; docs/gpu.md): the first call of a 15-minute
# lease (GPU_KIT_DEADLINE=540) runs what the open GPU issue needs first, skips only what does not
# fit, and names the skipped stages for the second call; bad stages and deadlines are errors.
set -euo pipefail
run_sh=$1
fail() { echo "check_run_plan: $*" >&2; exit 1; }

plan=$(GPU_KIT_DEADLINE=540 "$run_sh" --plan)
echo "$plan"
ran=$(awk '$1 == "run" {print $2}' <<<"$plan" | tr '\n' ' ')
[[ $ran == "kernels bench profile "* ]] || fail "the first call must start with kernels, bench, profile; runs: $ran"
# Every stage is planned once, in the kit's order, and a skipped one did not fit in what was left.
all=$("$run_sh" --plan | awk '$1 == "run" {print $2}' | tr '\n' ' ')
[[ $(awk '$1 == "run" || $1 == "skip" {print $2}' <<<"$plan" | tr '\n' ' ') == "$all" ]] ||
  fail "with a deadline the plan must list every stage of '$all' in that order"
awk '$1 == "skip" {gsub(/[(~]/, "", $3); if ($3 + 0 <= $5 + 0) exit 1}' <<<"$plan" ||
  fail "a stage that fitted was skipped"
total=$(sed -n 's/^total ~\([0-9]*\) s.*/\1/p' <<<"$plan")
((total <= 540)) || fail "planned ${total} s past the deadline of 540 s"
skipped=$(awk '$1 == "skip" {print $2}' <<<"$plan" | tr '\n' ' ')
[[ -z $skipped ]] || grep -q -x "next: scripts/gpu/run.sh ${skipped% }" <<<"$plan" ||
  fail "the plan must end with the command that runs the skipped stages ($skipped)"

# Named stages run in the order named; errors name what is wrong.
[[ $("$run_sh" --plan moe kernels | awk '$1 == "run" {print $2}' | tr '\n' ' ') == "moe kernels " ]] ||
  fail "named stages must run in the order named"
if message=$("$run_sh" --plan kernels bogus 2>&1); then fail "an unknown stage must be an error"; fi
grep -q "unknown stage 'bogus'" <<<"$message" || fail "the error must name the stage: $message"
if message=$(GPU_KIT_DEADLINE=soon "$run_sh" --plan 2>&1); then fail "a deadline not in seconds must be an error"; fi
grep -q "GPU_KIT_DEADLINE='soon'" <<<"$message" || fail "the error must name the deadline: $message"
echo "check_run_plan: ok"
