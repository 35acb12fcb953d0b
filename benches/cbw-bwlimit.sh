#!/usr/bin/env bash
# cbw-tap --bwlimit (issue 14): is the limit honoured, and charged to the
# background reader only?
#
# A SIZE (default 32M) image of random data is served by cbw-tap; for each
# limit (512K, 1M, 8M) it is backed up twice with
# `cbw-tap backup --bwlimit L | vma-encode - > /dev/null`:
#   - plain: the reader reads the whole image;
#   - rewritten: right after the instant (the --post hook) qemu-io rewrites
#     the second half, so copy-before-write reads that half, unlimited, and
#     the reader only the first half.
# For each: elapsed seconds (the backup's own elapsed_seconds; wall clock of
# the command beside it), the ideal = reader bytes / limit, and the ratio
# elapsed / ideal. Target: every ratio within 1.00 ± 0.10.
#
# Usage: benches/cbw-bwlimit.sh [WORKDIR]       (needs qemu-utils, python3)
# Env:   SIZE=32M  LIMITS="512K 1M 8M"
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /var/tmp/cbw-bwlimit.XXXXXX)}
mkdir -p "$work"
SIZE=${SIZE:-32M}
LIMITS=${LIMITS:-512K 1M 8M}

. "$root/scripts/vma-bin.sh"
bin=$VMA_BIN
for t in qemu-io python3 numfmt; do
  command -v $t >/dev/null || { echo "needs $t (apt-get install qemu-utils python3)" >&2; exit 3; }
done

srv=
cleanup() { [ -n "$srv" ] && kill "$srv" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

img="$work/disk.raw"
bytes=$(numfmt --from=iec "$SIZE")
head -c "$bytes" /dev/urandom > "$img"
half=$(( bytes / 2 ))
rm -f "$work/s" "$work/s.ctl"
"$bin/cbw-tap" serve --socket "$work/s" disk="$img" 2>"$work/serve.log" &
srv=$!
for _ in $(seq 1000); do [ -S "$work/s.ctl" ] && [ -S "$work/s" ] && break; sleep 0.01; done
uri="nbd+unix:///disk?socket=$work/s"

printf '== cbw-tap --bwlimit on a %s image (elapsed vs ideal = reader bytes / limit; target 1.00 +- 0.10)\n' "$SIZE"
printf '%-6s %-10s %12s %12s %9s %9s %9s %7s\n' limit case reader_bytes cbw_bytes ideal_s elapsed_s wall_s ratio
fail=0
for limit in $LIMITS; do
  for case in plain rewritten; do
    post=()
    if [ "$case" = rewritten ]; then
      post=(--post "qemu-io -f raw '$uri' -c 'write -P 0x5a $half $half' >/dev/null")
    fi
    t0=$(date +%s.%N)
    "$bin/cbw-tap" backup --control "$work/s.ctl" --bwlimit "$limit" --json "${post[@]}" \
      2>"$work/backup.json" | "$bin/vma-encode" - > /dev/null
    t1=$(date +%s.%N)
    line=$(python3 - "$work/backup.json" "$(numfmt --from=iec "$limit")" "$t0" "$t1" "$limit" "$case" <<'PY'
import json, sys
path, limit, t0, t1, name, case = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6]
doc = json.loads([l for l in open(path) if l.startswith("{")][-1])
assert doc["ok"], doc
s = doc["stats"]
ideal = s["reader_bytes_read"] / limit
ratio = s["elapsed_seconds"] / ideal
ok = abs(ratio - 1) <= 0.10
print("%-6s %-10s %12d %12d %9.2f %9.2f %9.2f %7.3f%s" % (
    name, case, s["reader_bytes_read"], s["cbw_bytes_read"], ideal,
    s["elapsed_seconds"], t1 - t0, ratio, "" if ok else "  OUTSIDE +-10%"))
PY
)
    echo "$line"
    case "$line" in *OUTSIDE*) fail=1 ;; esac
  done
done
echo "(the machine may be shared: elapsed can only grow under load, never shrink below the ideal)"
exit $fail
