#!/usr/bin/env bash
# Memory on hostile and on huge sparse input (issue 8, item 1). Prints the max
# RSS of each run next to the 64 MiB bound, and `cat` of the same input as the
# baseline:
#   - the issue's hostile archives: 1, 4 and 12 devices of 2^48 bytes, one
#     empty cluster every 2^18 clusters (154 KB, 578 KB, 1.7 MB), vma-verify;
#   - its hostile 256 KB cluster stream, vma-encode -;
#   - the worst case per input byte: ~99 MB of extent headers naming 11.5 M
#     lone clusters over 254 devices in a scrambled order (vma-verify), and
#     ~99 MB of stream records naming 6.2 M (vma-encode -);
#   - a 2 TiB sparse device holding 1 GiB of data (1024 regions of 1 MiB):
#     vma-encode -o, vma-verify, vma-decode extract.
# Usage: benches/memory.sh [WORKDIR]   (needs ~3 GiB free; /usr/bin/time)
# Env:   VMA_BIN=DIR with vma-encode, vma-verify, vma-decode (default: cargo
#        build --release); HOSTILE=path of vma-format's `hostile` example.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${VMA_BIN:-}" || -z "${HOSTILE:-}" ]]; then
  . "$root/scripts/vma-bin.sh"
  cargo build --release --manifest-path "$root/Cargo.toml" -p vma-format --example hostile >&2
  target=$(cargo metadata --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  HOSTILE=${HOSTILE:-$target/release/examples/hostile}
fi
[ -x /usr/bin/time ] || { echo "memory.sh: needs /usr/bin/time (apt-get install time)" >&2; exit 3; }
if [[ $# -ge 1 ]]; then work=$1; mkdir -p "$work"; else work=$(mktemp -d /var/tmp/vma-mem.XXXXXX); fi
trap 'rm -rf "$work"/out "$work"/sparse.raw "$work"/*.vma "$work"/*.stream' EXIT

# max RSS in KiB and wall seconds of a command (exit status ignored: the
# hostile inputs are refused, as they must be)
measure() { /usr/bin/time -f '%M %e' -o "$work/time" bash -c "$1" >/dev/null 2>"$work/err" || true; cat "$work/time" | tail -1; }
row() {  # label, input bytes, command
  local r c
  r=$(measure "$3"); cp "$work/err" "$work/err1"; c=$(measure "cat '$4' > /dev/null")
  local kib=${r% *} secs=${r#* }
  printf '%-44s %10s %9.1f MiB %7.2f s  (cat: %5.1f MiB)  %s\n' "$1" "$2" "$(echo "$kib / 1024" | bc -l)" \
    "$secs" "$(echo "${c% *} / 1024" | bc -l)" "$([ "$kib" -le 65536 ] && echo '<= 64 MiB ok' || echo 'OVER 64 MiB')"
  sed -n 1p "$work/err1" | cut -c1-120 | sed 's/^/    /'
}

echo "== memory benchmark ($(nproc) cores; machine possibly shared)"
printf '%-44s %10s %13s %9s\n' run input_bytes max_rss wall
for d in 1 4 12; do
  "$HOSTILE" archive "$d" 18 16384 > "$work/lone$d.vma"
  row "vma-verify: $d x 2^48 B devices, 1 in 2^18" "$(stat -c %s "$work/lone$d.vma")" "'$VMA_BIN/vma-verify' '$work/lone$d.vma'" "$work/lone$d.vma"
done
"$HOSTILE" stream 1 18 16384 > "$work/lone.stream"
row "vma-encode -: 256 KB stream, 1 in 2^18" "$(stat -c %s "$work/lone.stream")" "'$VMA_BIN/vma-encode' - < '$work/lone.stream'" "$work/lone.stream"
"$HOSTILE" archive-worst 99 > "$work/worst.vma"
row "vma-verify: 99 MB, 11.5 M lone clusters" "$(stat -c %s "$work/worst.vma")" "'$VMA_BIN/vma-verify' '$work/worst.vma'" "$work/worst.vma"
rm -f "$work/worst.vma"
"$HOSTILE" stream-worst 99 > "$work/worst.stream"
row "vma-encode -: 99 MB, 6.2 M lone clusters" "$(stat -c %s "$work/worst.stream")" "'$VMA_BIN/vma-encode' - < '$work/worst.stream'" "$work/worst.stream"
rm -f "$work/worst.stream"

sparse=$work/sparse.raw
rm -f "$sparse"; truncate -s 2T "$sparse"
python3 - "$sparse" <<'PY'
import os, sys
size, mib = 2 << 40, 1 << 20
with open(sys.argv[1], "r+b") as f:
    for i in range(1024):
        f.seek(i * (size // 1024))
        f.write(os.urandom(mib))
PY
rm -f "$work/sparse.vma"
row "vma-encode -o: 2 TiB sparse, 1 GiB data" "$(stat -c %s "$sparse")" "'$VMA_BIN/vma-encode' --ctime 0 -o '$work/sparse.vma' 'drive-scsi0=$sparse'" /dev/null
rm -f "$sparse"
row "vma-verify: that archive" "$(stat -c %s "$work/sparse.vma")" "'$VMA_BIN/vma-verify' '$work/sparse.vma'" "$work/sparse.vma"
row "vma-decode extract: that archive" "$(stat -c %s "$work/sparse.vma")" "rm -rf '$work/out'; '$VMA_BIN/vma-decode' extract '$work/sparse.vma' '$work/out'" "$work/sparse.vma"
