#!/usr/bin/env bash
# Compressed-restore benchmark (issue 7). Prints, in one run, against
# baselines measured in the same run on the same files (page cache warm):
#   - vma-decode extract FILE.vma.zst DIR   vs  zstd -dc FILE > /dev/null
#     (target >= 0.9: the extract is bound by decompression, which runs on its
#     own thread while the main thread parses and writes)
#   - vma-decode extract FILE.vma.zst DIR   vs  zstd -dc FILE | vma-decode extract - DIR
#   - the same for pigz (.gz) and lzop (.lzo), and vma-verify FILE.zst vs zstd -dc
#   - the plain archive: vma-decode extract FILE.vma DIR (for reference)
#   - extract FILE.vma.zst into a tmpfs DIR (/dev/shm) vs zstd -dc: with the
#     storage out of the picture, what the extract itself adds to decompression
#     (on a disk slower than zstd, the disk bounds both extract and pipe)
# The disk: 1 GiB; per MiB 256 KiB random, 512 KiB of compressible text-like
# data, 256 KiB of zeros (zero blocks are not stored). Archives: ours (with
# data checksums) and Proxmox-like (--no-data-checksums: as Proxmox writes).
# Compressed as vzdump does: zstd -T0 --rsyncable, pigz, lzop.
# Ratios > 1 mean faster than the baseline.
# Usage: benches/compressed.sh [WORKDIR]   (needs ~4 GiB free; zstd, pigz, lzop, python3)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /var/tmp/vma-bench-z.XXXXXX)}
mkdir -p "$work"
shm=/dev/shm/vma-bench-z.$$
trap 'rm -rf "$work"/out-* "$shm"' EXIT

. "$root/scripts/vma-bin.sh"
bin=$VMA_BIN
for t in zstd pigz lzop python3; do command -v $t >/dev/null || { echo "needs $t" >&2; exit 3; }; done

# best of 3 wall-clock seconds of a shell command (its output discarded)
best() {
  local best="" s e t
  for _ in 1 2 3; do
    s=$(date +%s.%N); bash -c "$1" >/dev/null; e=$(date +%s.%N)
    t=$(awk -v a="$s" -v b="$e" 'BEGIN { printf "%.6f", b - a }')
    if [ -z "$best" ] || awk -v t="$t" -v b="$best" 'BEGIN { exit !(t < b) }'; then best=$t; fi
  done
  echo "$best"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
mibs() { awk -v s="$1" -v t="$2" 'BEGIN { printf "%.0f", s / 1048576 / t }'; }

img="$work/mixed.raw"
if [ "$(stat -c %s "$img" 2>/dev/null)" != 1073741824 ]; then
  python3 - "$img" <<'PY'
import os, random, sys
rnd = random.Random(7)
words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9))) for _ in range(5000)]
pool = bytearray()
while len(pool) < 16 << 20:  # 16 MiB of text, sliced at random offsets below
    pool += b" ".join(rnd.choices(words, k=1000)) + b"\n"
with open(sys.argv[1], "wb") as f:
    for mib in range(1024):
        at = rnd.randrange(len(pool) - (512 << 10))
        f.write(os.urandom(256 << 10) + bytes(pool[at:at + (512 << 10)]) + bytes(256 << 10))
PY
fi

echo "== compressed restore benchmark ($(nproc) cores, page cache warm, best of 3)"
echo "disk: 1 GiB (per MiB: 256 KiB random, 512 KiB text-like, 256 KiB zeros)"
for kind in ours proxmox; do
  flags=(); [ "$kind" = proxmox ] && flags=(--no-data-checksums)
  arch="$work/$kind.vma"
  "$bin/vma-encode" "${flags[@]}" --uuid 00000000-0000-0000-0000-000000000007 --ctime 0 \
    -c qemu-server.conf=/dev/null -o "$arch" "drive-scsi0=$img" 2>/dev/null
  zstd -q -f -T0 --rsyncable "$arch" -o "$arch.zst"
  pigz -f -k "$arch"
  lzop -f -q "$arch" -o "$arch.lzo"
  size=$(stat -c %s "$arch")
  echo "archive: $kind ($((size / 1048576)) MiB plain, zst $(( $(stat -c %s "$arch.zst") / 1048576 )) MiB," \
       "gz $(( $(stat -c %s "$arch.gz") / 1048576 )) MiB, lzo $(( $(stat -c %s "$arch.lzo") / 1048576 )) MiB)"
  cat "$arch" "$arch".* > /dev/null
  t_plain=$(best "rm -rf '$work/out-p'; '$bin/vma-decode' extract '$arch' '$work/out-p'")
  printf '  %-52s %7.3f s %6s MiB/s\n' "vma-decode extract FILE.vma DIR" "$t_plain" "$(mibs "$size" "$t_plain")"
  for c in "zstd:zst" "pigz:gz" "lzop:lzo"; do
    tool=${c%%:*} ext=${c#*:}
    f="$arch.$ext"
    t_dec=$(best "$tool -dc '$f' > /dev/null")
    t_ext=$(best "rm -rf '$work/out-1'; '$bin/vma-decode' extract '$f' '$work/out-1'")
    t_pipe=$(best "rm -rf '$work/out-2'; $tool -dc '$f' | '$bin/vma-decode' extract - '$work/out-2'")
    printf '  %-52s %7.3f s %6s MiB/s\n' "$tool -dc FILE > /dev/null" "$t_dec" "$(mibs "$size" "$t_dec")"
    printf '  %-52s %7.3f s %6s MiB/s\n' "$tool -dc FILE | vma-decode extract - DIR" "$t_pipe" "$(mibs "$size" "$t_pipe")"
    printf '  %-52s %7.3f s %6s MiB/s   ratio to %s -dc: %s, to the pipe: %s\n' \
      "vma-decode extract FILE.$ext DIR" "$t_ext" "$(mibs "$size" "$t_ext")" "$tool" \
      "$(ratio "$t_dec" "$t_ext")" "$(ratio "$t_pipe" "$t_ext")"
    if [ "$tool" = zstd ] && [ -d /dev/shm ]; then
      t_shm=$(best "rm -rf '$shm'; '$bin/vma-decode' extract '$f' '$shm'")
      printf '  %-52s %7.3f s %6s MiB/s   ratio to zstd -dc: %s\n' "vma-decode extract FILE.zst /dev/shm/DIR" "$t_shm" \
        "$(mibs "$size" "$t_shm")" "$(ratio "$t_dec" "$t_shm")"
      rm -rf "$shm"
    fi
    if [ "$tool" = zstd ]; then
      t_ver=$(best "'$bin/vma-verify' -q '$f'")
      printf '  %-52s %7.3f s %6s MiB/s   ratio to zstd -dc: %s\n' "vma-verify -q FILE.zst" "$t_ver" \
        "$(mibs "$size" "$t_ver")" "$(ratio "$t_dec" "$t_ver")"
    fi
  done
done
