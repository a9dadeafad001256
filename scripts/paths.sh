# Sourced by the launchers before they cd into the repository: the paths a caller gives are
# relative to the caller's folder, so they are made absolute first.
#   . "$(dirname "$0")/scripts/paths.sh"
#   abs_vars DATA MODEL EXP     # each variable that is set, non-empty and relative becomes absolute
#   abs_args "$@"               # ARGV: the arguments, the value of every path flag made absolute
#   cd "$(dirname "$0")"
#   "$PYTHON" script.py ... ${ARGV[@]+"${ARGV[@]}"}
# PYTHON is made absolute only when it holds a "/" (a bare command such as python3 is looked up
# in PATH). Path flags: --flag VALUE and --flag=VALUE; other arguments are passed on unchanged.
CALLER_PWD="$PWD"
PATH_FLAGS=" --data --data_path --model --exp --dump_path --resume --vocdir --whiten_data --gnd --file_list "
PATH_FLAGS+=" --knn_data --out "

# abs_path P: P against the caller's folder (absolute and empty values unchanged)
abs_path() {
  case "$1" in
    ""|/*) printf '%s' "$1" ;;
    ./*) printf '%s/%s' "$CALLER_PWD" "${1#./}" ;;
    *) printf '%s/%s' "$CALLER_PWD" "$1" ;;
  esac
}

abs_vars() {
  local name value
  for name in "$@"; do
    value="${!name:-}"
    if [ "$name" = PYTHON ] && [[ "$value" != */* ]]; then continue; fi
    [ -n "$value" ] && printf -v "$name" '%s' "$(abs_path "$value")"
  done
  return 0
}

abs_args() {
  ARGV=()
  local a flag want=0
  for a in "$@"; do
    if [ "$want" = 1 ]; then
      ARGV+=("$(abs_path "$a")")
      want=0
      continue
    fi
    case "$a" in
      --*=*)
        flag="${a%%=*}"
        if [[ "$PATH_FLAGS" == *" $flag "* ]]; then
          ARGV+=("$flag=$(abs_path "${a#*=}")")
          continue
        fi ;;
      --*) [[ "$PATH_FLAGS" == *" $a "* ]] && want=1 ;;
    esac
    ARGV+=("$a")
  done
  return 0
}
