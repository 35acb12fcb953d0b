#!/usr/bin/env bash
# Convert every disk of a backup to qcow2 without extracting raw images
# first: `vma-decode serve` exports the archive's disks over NBD and
# `qemu-img convert` reads them from there (holes stay holes).
#
#   examples/to-qcow2.sh ARCHIVE OUTDIR
#
# Writes OUTDIR/NAME.qcow2 per disk (the RAM state, vmstate, is skipped)
# and prints one line per disk. A compressed archive (.vma.zst, …) is
# decompressed once into an unnamed file in OUTDIR (--cache), so OUTDIR
# needs room for it while this runs. Needs qemu-img (qemu-utils). Uses the
# binaries in $VMA_BIN or on PATH.
set -euo pipefail
if [ -n "${VMA_BIN:-}" ]; then PATH="$VMA_BIN:$PATH"; fi
[ $# = 2 ] || { echo "to-qcow2: usage: to-qcow2.sh ARCHIVE OUTDIR" >&2; exit 2; }
archive=$1 out=$2
mkdir -p "$out"
out=$(cd "$out" && pwd)
run=$(mktemp -d "${TMPDIR:-/tmp}/to-qcow2.XXXXXX")
server=""
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$run"
}
trap cleanup EXIT
# One export per device (disks and vmstate): as many URI lines to read.
devices=$(vma-decode list "$archive" | grep -c -e '^DEV: ' -e '^VMSTATE: ' || true)
mkfifo "$run/uris"
vma-decode serve --socket "$run/nbd.sock" --cache "$out" "$archive" > "$run/uris" 2> "$run/serve.log" &
server=$!
exec 3< "$run/uris"
uris=()
for _ in $(seq "$devices"); do
  if ! read -r uri <&3; then
    # The server stopped before listening: its message says why.
    cat "$run/serve.log" >&2
    wait "$server" && exit 3 || exit $?
  fi
  uris+=("$uri")
done
for uri in "${uris[@]}"; do
  name=${uri#nbd+unix:///}
  name=${name%%\?*}
  [ "$name" = vmstate ] && continue
  qemu-img convert -f raw -O qcow2 "$uri" "$out/$name.qcow2"
  echo "to-qcow2: $out/$name.qcow2 ($(qemu-img info --output=json "$out/$name.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])') bytes virtual)"
done
