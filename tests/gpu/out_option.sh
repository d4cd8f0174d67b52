# Sourced by the GPU scripts:   source tests/gpu/out_option.sh DEFAULT_DIR "$@"
# Takes `--out DIR` (or `--out=DIR`) from anywhere among the arguments into OUT_DIR (default
# DEFAULT_DIR), creates it, and leaves the other arguments, in order, in the array ARGS; the script
# then restores them with:   set -- ${ARGS[@]+"${ARGS[@]}"}
OUT_DIR=$1; shift; ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR=$2; shift 2;;
    --out=*) OUT_DIR=${1#--out=}; shift;;
    *) ARGS+=("$1"); shift;;
  esac
done
mkdir -p "$OUT_DIR"
