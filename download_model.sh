#!/usr/bin/env bash
# Fetch the released DeepCluster models into ${MODELROOT} (default ${HOME}/deepcluster_models),
# as the original download_model.sh did, plus the released cluster assignments and
# DeepCluster-v2's ResNet-50 (SwAV repository's release):
#   MODELROOT/alexnet/{checkpoint.pth.tar, model.caffemodel, model.prototxt, alexnet_cluster_assignment.pickle}
#   MODELROOT/vgg16/{checkpoint.pth.tar, model.caffemodel, model.prototxt, vgg16_cluster_assignment.pickle}
#   MODELROOT/deepclusterv2/deepclusterv2_800ep_pretrain.pth.tar
#
# Usage:
#   ./download_model.sh                       # everything above (about 2.5 GB)
#   ./download_model.sh alexnet               # one model (alexnet, vgg16, deepclusterv2)
#   NO_CAFFE=1 ./download_model.sh            # PyTorch files only
#   FEATURES=1 ./download_model.sh alexnet    # also the released ImageNet fc7 features (large)
#   MODELROOT=/data/models ./download_model.sh
#
# Resumable: a file is fetched into NAME.part (curl -C -, else wget -c; DOWNLOADER=curl|wget
# forces one), retried RETRIES times (default 3) from where it stopped, and run again it goes on
# from the .part. Verified before it takes its name: checkpoints load with the project's loader
# (checkpoint.load_model, the right architecture), pickles are lists of (path, cluster), a
# prototxt is text, and where MODELROOT/SHA256SUMS lists the file (sha256sum's format, paths
# relative to MODELROOT) its hash must match; a file that fails is deleted and reported (exit 1).
# Files already under their final name were verified by an earlier run and are skipped.
# BASE_URL (default https://dl.fbaipublicfiles.com/deepcluster, the original's) replaces the server.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
MODELROOT="${MODELROOT:-${HOME}/deepcluster_models}"
BASE_URL="${BASE_URL:-https://dl.fbaipublicfiles.com/deepcluster}"
RETRIES="${RETRIES:-3}"
PYTHON="${PYTHON:-$([ -x "${ROOT}/.venv/bin/python" ] && echo "${ROOT}/.venv/bin/python" || echo python3)}"

die() { echo "error: $*" >&2; exit 2; }

case "${1:-}" in -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0;; esac
models=("$@")
[ ${#models[@]} -eq 0 ] && models=(alexnet vgg16 deepclusterv2)
for m in "${models[@]}"; do
  case "$m" in alexnet|vgg16|deepclusterv2) ;; *) die "unknown model '$m' (expected alexnet, vgg16 or deepclusterv2)";; esac
done

if [ -n "${DOWNLOADER:-}" ]; then
  command -v "${DOWNLOADER}" >/dev/null || die "DOWNLOADER=${DOWNLOADER} is not installed"
elif command -v curl >/dev/null; then DOWNLOADER=curl
elif command -v wget >/dev/null; then DOWNLOADER=wget
else die "neither curl nor wget is installed"
fi
case "${DOWNLOADER}" in curl|wget) ;; *) die "DOWNLOADER must be curl or wget, not '${DOWNLOADER}'";; esac

mkdir -p "${MODELROOT}" 2>/dev/null && [ -w "${MODELROOT}" ] || die "MODELROOT ${MODELROOT} is not writable"

# fetch URL PART: append to PART from its current size (one attempt; non-zero on failure)
fetch() {
  if [ "${DOWNLOADER}" = curl ]; then
    curl -fsSL --retry 0 --connect-timeout 20 -C - -o "$2" "$1"
  else
    wget -q -c -T 20 -t 1 -O "$2" "$1"
  fi
}

size_of() { stat -c %s "$1" 2>/dev/null || echo 0; }

# remote_size URL: the server's Content-Length (empty when it does not say)
remote_size() {
  if [ "${DOWNLOADER}" = curl ]; then
    curl -fsSLI --connect-timeout 20 "$1" 2>/dev/null
  else
    wget -q -S --spider -T 20 -t 1 "$1" 2>&1
  fi | tr -d '\r' | awk 'tolower($1) == "content-length:" {n = $2} END {if (n != "") print n}'
}

# verify FILE KIND ARCH REL: the file is what it should be (0) or not (1, reason on stderr)
verify() {
  local want
  # a hash known for this file (MODELROOT/SHA256SUMS, "sha256  alexnet/checkpoint.pth.tar" lines): checked first
  want=$(awk -v f="$4" '$2 == f {print $1}' "${MODELROOT}/SHA256SUMS" 2>/dev/null | head -1)
  if [ -n "${want}" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" != "${want}" ]; then
    echo "sha256 differs from ${MODELROOT}/SHA256SUMS" >&2; return 1
  fi
  case "$2" in
    prototxt) grep -q "layer" "$1" 2>/dev/null || { echo "not a Caffe prototxt" >&2; return 1; } ;;
    caffemodel) [ "$(size_of "$1")" -gt 1000000 ] || { echo "too small for a caffemodel" >&2; return 1; } ;;
    checkpoint)  # the project's loader: a state dict of the right architecture
      "${PYTHON}" - "$1" "$3" <<'EOF' || return 1
import logging, os, sys
sys.path.insert(0, os.environ["DC_ROOT"])
logging.disable(logging.WARNING)  # the DeepCluster-v2 head the loader ignores is expected
try:
    import checkpoint
    checkpoint.load_model(sys.argv[1], arch=sys.argv[2], purpose="download_model.sh")
except Exception as e:
    print(" ".join(str(e).split()), file=sys.stderr)
    sys.exit(1)
EOF
      ;;
    pickle)  # the release's format: a list of (image path, cluster index); Python 2 strings as latin1
      "${PYTHON}" - "$1" <<'EOF' || return 1
import pickle, sys
try:
    with open(sys.argv[1], "rb") as f:
        obj = pickle.load(f, encoding="latin1")
    assert isinstance(obj, list) and obj and all(isinstance(t, tuple) and len(t) == 2 for t in obj[:1000]), \
        "not a list of (image path, cluster index) tuples"
except Exception as e:
    print(f"not a cluster-assignment pickle: {e}", file=sys.stderr)
    sys.exit(1)
EOF
      ;;
  esac
}
export DC_ROOT="${ROOT}"

# get URL DEST KIND ARCH: fetch into DEST.part with resume and retries, verify, rename
failed=0
get() {
  local url="$1" dest="$2" kind="$3" arch="$4" part="$2.part" attempt=1 before reason total
  if [ -f "${dest}" ]; then echo "ok (already there) ${dest}"; return 0; fi
  mkdir -p "$(dirname "${dest}")"
  while :; do
    before=$(size_of "${part}")
    [ "${before}" -gt 0 ] && echo "resuming ${url} at byte ${before}" || echo "fetching ${url}"
    if fetch "${url}" "${part}"; then break; fi
    # a .part already complete (killed before its check) is answered 416 to a resume by some servers
    total=$(remote_size "${url}")
    if [ -n "${total}" ] && [ "$(size_of "${part}")" = "${total}" ]; then break; fi
    if [ "${attempt}" -ge "${RETRIES}" ]; then
      if [ "$(size_of "${part}")" -gt 0 ]; then
        echo "error: ${url}: transfer failed ${attempt} times; run again to resume from byte $(size_of "${part}") of ${part}" >&2
      else
        echo "error: ${url}: cannot be fetched with ${DOWNLOADER} (network, or no such file)" >&2
        rm -f "${part}"
      fi
      failed=1; return 1
    fi
    attempt=$((attempt + 1))
  done
  if ! reason=$(verify "${part}" "${kind}" "${arch}" "${dest#"${MODELROOT}/"}" 2>&1); then
    rm -f "${part}"
    echo "error: ${url}: corrupt download, deleted (${reason:-check failed}); run again to fetch it anew" >&2
    failed=1; return 1
  fi
  mv -f "${part}" "${dest}"
  echo "ok $(size_of "${dest}") bytes ${dest}"
}

for m in "${models[@]}"; do
  d="${MODELROOT}/${m}"
  if [ "$m" = deepclusterv2 ]; then
    get "${BASE_URL}/deepclusterv2_800ep_pretrain.pth.tar" "${d}/deepclusterv2_800ep_pretrain.pth.tar" checkpoint resnet50
    continue
  fi
  get "${BASE_URL}/${m}/checkpoint.pth.tar" "${d}/checkpoint.pth.tar" checkpoint "$m"
  if [ "${NO_CAFFE:-0}" != 1 ]; then
    get "${BASE_URL}/${m}/model.prototxt" "${d}/model.prototxt" prototxt "$m"
    get "${BASE_URL}/${m}/model.caffemodel" "${d}/model.caffemodel" caffemodel "$m"
  fi
  get "${BASE_URL}/${m}/${m}_cluster_assignment.pickle" "${d}/${m}_cluster_assignment.pickle" pickle "$m"
  if [ "${FEATURES:-0}" = 1 ]; then
    get "${BASE_URL}/${m}/${m}_features.pkl" "${d}/${m}_features.pkl" other "$m"
  fi
done
exit "${failed}"
