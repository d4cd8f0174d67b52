# Sourced by the one-call GPU scripts (run_all.sh, run_gemm.sh): a budgeted step runner.
#   START, BUDGET, LOG must be set; STEP_MIN_LEFT (default 20) is the least time worth starting a step.
#   step NAME SECONDS CMD...   runs CMD under `timeout SECONDS` (cut to what is left of BUDGET),
#   appends its output to LOG, prints "=== NAME rc=N", returns N; skipped once the budget is spent.
#   STEP_STOP_ON_FAIL=NAME: a failure of that step spends the rest of the budget on nothing
#   (the first differential test failing means the kernels are wrong), unless EEP_GPU_KEEP_GOING=1.
step() {
  local name=$1 secs=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ $left -lt "${STEP_MIN_LEFT:-20}" ]; then echo "=== $name rc=SKIPPED (budget)" | tee -a "$LOG"; return 0; fi
  [ $secs -gt $left ] && secs=$left
  echo "=== $name ($(date +%T))" | tee -a "$LOG"
  timeout -k 5 "$secs" "$@" >>"$LOG" 2>&1; local rc=$?
  echo "=== $name rc=$rc" | tee -a "$LOG"
  if [ $rc -ne 0 ] && [ "$name" = "${STEP_STOP_ON_FAIL:-}" ] && [ "${EEP_GPU_KEEP_GOING:-0}" = 0 ]; then BUDGET=0; fi
  return $rc
}
