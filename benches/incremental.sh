#!/usr/bin/env bash
# Incremental forever (issue 13), in one run on one image:
#
# 1. A full live backup `cbw-tap backup --uuid-from NAME | vma-encode
#    --sorted -o full.vma -`, then qemu-io writes to $CHANGE_PERMILLE per
#    mille of the clusters (one 4 KiB write in each), then
#    `cbw-tap backup --incremental --uuid-from NAME | vma-encode --base
#    full.vma -o inc.vma -`, and for comparison a full backup of the same
#    disk again. Printed: disk bytes read by the backup (its own counters)
#    and wall time, incremental+merge / full, as ratios (< 1: cheaper).
# 2. `rdiff` (librsync) delta of inc.vma against full.vma (what rsync, and
#    about what restic/borg, store for the second archive) vs the changed
#    data (changed clusters x 64 KiB): target <= 2.
# 3. The merge alone (vma-encode --base, and --sorted --base, from the saved
#    incremental stream, into /dev/null) against `cat` of the base into
#    /dev/null: the same bytes read from the page cache; the ratio is what
#    merging costs beyond reading the base.
# The merged archive is checked: it decodes to the disk.
#
# Usage: benches/incremental.sh [WORKDIR]
# Env:   SIZE=256M (image size; SIZE=4G for the issue's figure)
#        REPEAT=3 (runs of each "merge alone" and cp timing, the fastest kept)
#        CHANGE_PERMILLE=10 (1 %)
#        BIN=DIR: use the binaries in DIR instead of building them
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /var/tmp/incr-bench.XXXXXX)}
mkdir -p "$work"
SIZE=${SIZE:-256M}
CHANGE_PERMILLE=${CHANGE_PERMILLE:-10}
if [ -n "${BIN:-}" ]; then
  bin=$BIN
else
  cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p cbw-tap -p vma-encode -p vma-decode
  bin="${CARGO_TARGET_DIR:-$root/target}/release"
fi
for t in qemu-io rdiff python3; do
  command -v $t >/dev/null || { echo "incremental.sh: $t is needed" >&2; exit 2; }
done
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

bytes=$(python3 -c "import sys; s=sys.argv[1]; m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))" "$SIZE")
clusters=$((bytes / 65536))
img=$work/disk.raw
echo "image: $SIZE ($clusters clusters), random data; $CHANGE_PERMILLE per mille of the clusters rewritten"
head -c "$bytes" /dev/urandom > "$img"
mkdir -p "$work/state"
"$bin/cbw-tap" serve --socket "$work/s" --state-dir "$work/state" drive-scsi0="$img" 2>"$work/serve.log" &
pid=$!
for _ in $(seq 200); do [ -S "$work/s.ctl" ] && break; sleep 0.05; done

# seconds CMD…: runs CMD, prints its wall time
seconds() {
  local t0 t1
  t0=$(date +%s.%N)
  "$@"
  t1=$(date +%s.%N)
  python3 -c "print(f'{$t1-$t0:.3f}')"
}

# best CMD… [--stdin-file FILE] [--stdout-null]: the fastest of $REPEAT
# runs of CMD (its standard input FILE, its standard output /dev/null),
# each after a sync, in seconds
REPEAT=${REPEAT:-3}
best() {
  local args=() in=/dev/null out=/dev/stdout b=
  while [ $# -gt 0 ]; do
    case $1 in
      --stdin-file) in=$2; shift 2 ;;
      --stdout-null) out=/dev/null; shift ;;
      *) args+=("$1"); shift ;;
    esac
  done
  [ "$in" = /dev/null ] || args+=(-)
  for _ in $(seq "$REPEAT"); do
    sync
    local t t0 t1
    t0=$(date +%s.%N)
    "${args[@]}" < "$in" > "$out"
    t1=$(date +%s.%N)
    t=$(python3 -c "print(f'{$t1-$t0:.3f}')")
    b=$(python3 -c "import sys; a=sys.argv[1]; b=sys.argv[2]; print(b if a == '' or float(b) < float(a) else a)" "$b" "$t")
  done
  echo "$b"
}

# backup ARGS ENCODE-ARGS OUT: prints "seconds bytes-read" (the stream is
# also kept in $STREAM_COPY when set)
backup() {
  local t0 t1
  t0=$(date +%s.%N)
  "$bin/cbw-tap" backup --control "$work/s.ctl" $1 2>"$work/b.err" | tee "${STREAM_COPY:-/dev/null}" | "$bin/vma-encode" $2 -o "$3" -
  t1=$(date +%s.%N)
  local read
  read=$(sed -n 's/^cbw-tap backup: read from drive-scsi0: \([0-9]*\) bytes$/\1/p' "$work/b.err")
  echo "$(python3 -c "print(f'{$t1-$t0:.3f}')") $read"
}

printf 'name: bench\n' > "$work/qemu-server.conf"
sync
read -r t_full0 r_full0 < <(backup "--uuid-from bench-vm" "--sorted -c $work/qemu-server.conf" "$work/full.vma")
echo "full backup (--sorted): $t_full0 s, $r_full0 bytes read"

n=$((clusters * CHANGE_PERMILLE / 1000)); [ "$n" -ge 1 ] || n=1
python3 - "$clusters" "$n" > "$work/cmds" <<'PY'
import random, sys
c, n = int(sys.argv[1]), int(sys.argv[2])
random.seed(13)
for k in random.sample(range(c), n):
    print(f"write -P {k % 250 + 1} {k * 65536 + 4096 * random.randrange(16)} 4096")
PY
args=()
while read -r l; do args+=(-c "$l"); done < "$work/cmds"
qemu-io -f raw "nbd+unix:///drive-scsi0?socket=$work/s" "${args[@]}" >/dev/null
echo "rewrote $n clusters"

STREAM_COPY=$work/inc.stream
read -r t_inc r_inc < <(backup "--incremental --uuid-from bench-vm" "--base $work/full.vma" "$work/inc.vma")
echo "incremental + merge: $t_inc s, $r_inc bytes read"
# The merge alone, from the saved stream, against copying the base (the
# same bytes read and written): what the merge costs beyond a copy.
# Both --sorted and not give the archive the pipeline wrote; then each is
# timed as the fastest of $REPEAT runs into /dev/null (the base in the page
# cache, no disk write: the merge's own work), against cat of the base.
"$bin/vma-encode" --sorted --base "$work/full.vma" -o "$work/ms.vma" - < "$STREAM_COPY"
"$bin/vma-encode" --base "$work/full.vma" -o "$work/m.vma" - < "$STREAM_COPY"
cmp -s "$work/m.vma" "$work/inc.vma" && cmp -s "$work/ms.vma" "$work/inc.vma" || { echo "merges from the saved stream differ" >&2; exit 1; }
rm -f "$work/m.vma" "$work/ms.vma"
t_cp=$(best cat "$work/full.vma" --stdout-null)
t_merge=$(best "$bin/vma-encode" --base "$work/full.vma" -o /dev/null --stdin-file "$STREAM_COPY")
t_smerge=$(best "$bin/vma-encode" --sorted --base "$work/full.vma" -o /dev/null --stdin-file "$STREAM_COPY")
echo "merge alone: $t_merge s (--sorted: $t_smerge s); cat of the base: $t_cp s"
STREAM_COPY=
read -r t_full r_full < <(backup "" "-c $work/qemu-server.conf" "$work/full2.vma")
echo "full backup again:    $t_full s, $r_full bytes read"
rm -f "$work/full2.vma"

"$bin/vma-decode" extract "$work/inc.vma" "$work/x" >/dev/null
if cmp -s <(head -c "$bytes" "$work/x/disk-drive-scsi0.raw") "$img"; then
  echo "merged archive: decodes to the disk"
else
  echo "merged archive: DIFFERS from the disk" >&2; exit 1
fi

rdiff signature "$work/full.vma" "$work/sig"
rdiff delta "$work/sig" "$work/inc.vma" "$work/delta"
delta=$(stat -c %s "$work/delta")
changed=$((n * 65536))
python3 - "$r_inc" "$r_full" "$t_inc" "$t_full" "$delta" "$changed" "$t_merge" "$t_smerge" "$t_cp" <<'PY'
import sys
ri, rf, ti, tf, d, c, tm, ts, tc = map(float, sys.argv[1:])
print(f"ratio disk bytes read, incremental+merge / full: {ri/rf:.4f}")
print(f"ratio wall time,       incremental+merge / full: {ti/tf:.3f}")
print(f"ratio wall time,       merge alone / cat of the base: {tm/tc:.3f} (--sorted: {ts/tc:.3f})")
print(f"rdiff delta of the merged archive vs the base: {int(d)} bytes; changed data {int(c)} bytes; ratio {d/c:.2f} (target <= 2)")
PY
