#!/usr/bin/env bash
# Decode-side benchmark (issue 2). Prints, in one run and against baselines
# measured in the same run on the same bytes:
#   - vma-verify throughput as a ratio to `cat ARCHIVE > /dev/null`
#   - vma-decode extract throughput as a ratio to `cp ARCHIVE DIR/`
#   - vma-decode extract max RSS on a 1 GiB archive and on a 100 GiB
#     mostly-sparse device (RSS must not grow with archive size)
# Usage: benches/decode.sh [WORKDIR]   (default: a fresh temp dir; needs ~3 GiB free)
# Ratios > 1 mean faster than the baseline.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /var/tmp/vma-bench.XXXXXX)}
mkdir -p "$work"
trap 'rm -rf "$work"/out-* "$work"/cp-*' EXIT

cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p vma-encode -p vma-decode -p vma-verify
bin="$root/target/release"
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (apt-get install time)" >&2; exit 3; }

# best of 3 wall-clock seconds of a shell command
best() {
  local best=""
  for _ in 1 2 3; do
    local s e t
    s=$(date +%s.%N); bash -c "$1"; e=$(date +%s.%N)
    t=$(awk -v a="$s" -v b="$e" 'BEGIN { printf "%.6f", b - a }')
    if [ -z "$best" ] || awk -v t="$t" -v b="$best" 'BEGIN { exit !(t < b) }'; then best=$t; fi
  done
  echo "$best"
}
rss_kib() { /usr/bin/time -f %M bash -c "$1" 2>&1 >/dev/null | tail -1; }

img="$work/half.raw"
if [ ! -f "$img" ]; then
  echo "generating 1 GiB image: 4 KiB blocks alternating random / zero ..."
  python3 - "$img" <<'PY'
import os, sys
blk = 4096
with open(sys.argv[1], "wb") as f:
    for i in range(1 << 15):  # 32768 chunks of 32 KiB = 1 GiB
        rnd = os.urandom(4 * blk)
        f.write(b"".join(rnd[j*blk:(j+1)*blk] + bytes(blk) for j in range(4)))
PY
fi
arch="$work/half.vma"
"$bin/vma-encode" --uuid 00000000-0000-0000-0000-000000000001 --ctime 0 -o "$arch" "drive-scsi0=$img"
size=$(stat -c %s "$arch")
echo "archive: $arch ($size bytes)"
cat "$arch" > /dev/null  # warm the page cache for every contender alike

t_cat=$(best "cat '$arch' > /dev/null")
t_verify=$(best "'$bin/vma-verify' -q '$arch'")
t_cp=$(best "rm -rf '$work/cp-1'; mkdir '$work/cp-1'; cp '$arch' '$work/cp-1/'")
t_extract=$(best "rm -rf '$work/out-1'; '$bin/vma-decode' extract '$arch' '$work/out-1'")
rss_1g=$(rss_kib "rm -rf '$work/out-2'; '$bin/vma-decode' extract '$arch' '$work/out-2'")

sparse="$work/sparse100g.raw"
rm -f "$sparse"; truncate -s 100G "$sparse"
for off in 0 7 33 61 99; do  # a few GiB-spaced data regions, 16 MiB each
  dd if=/dev/urandom of="$sparse" bs=1M count=16 seek=$((off * 1024)) conv=notrunc status=none
done
arch100="$work/sparse100g.vma"
"$bin/vma-encode" -o "$arch100" "drive-scsi0=$sparse"
rss_100g=$(rss_kib "rm -rf '$work/out-3'; '$bin/vma-decode' extract '$arch100' '$work/out-3'")
rm -rf "$work/out-3" "$sparse"

mib() { awk -v s="$size" -v t="$1" 'BEGIN { printf "%.0f", s / 1048576 / t }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo
echo "== decode benchmark ($(nproc) cores; archive $((size / 1048576)) MiB, page cache warm)"
printf '%-34s %8.3f s  %8s MiB/s\n' "cat ARCHIVE > /dev/null" "$t_cat" "$(mib "$t_cat")"
printf '%-34s %8.3f s  %8s MiB/s   ratio to cat: %s\n' "vma-verify ARCHIVE" "$t_verify" "$(mib "$t_verify")" "$(ratio "$t_cat" "$t_verify")"
printf '%-34s %8.3f s  %8s MiB/s\n' "cp ARCHIVE DIR/" "$t_cp" "$(mib "$t_cp")"
printf '%-34s %8.3f s  %8s MiB/s   ratio to cp: %s\n' "vma-decode extract ARCHIVE DIR" "$t_extract" "$(mib "$t_extract")" "$(ratio "$t_cp" "$t_extract")"
echo "vma-decode extract max RSS: 1 GiB archive ${rss_1g} KiB; 100 GiB sparse device ${rss_100g} KiB"
