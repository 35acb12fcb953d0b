#!/usr/bin/env bash
# Benchmark of `vma-decode serve` (issue 11). Prints, in one run, against
# baselines measured in the same run:
#   1. index time of a >= 10 GiB plain archive (target < 2 s), cold (the
#      archive's pages dropped from the page cache) and warm, as a ratio to
#      `cat ARCHIVE > /dev/null` (what any streaming reader must at least do)
#      and to `vma-verify -q`; and the time to load its saved index;
#   2. random 4 KiB reads (queue depth 1, qemu-io) through serve vs through
#      `qemu-nbd` serving the extracted raw image: with data checksums (first
#      pass: each extent verified on first touch; second pass: verified) and
#      without (as Proxmox's archives);
#   3. `qemu-img convert -O qcow2` via serve vs extract-then-convert, from a
#      plain and from a zstd-compressed archive: time and peak disk space.
# The 10 GiB archive is made from a cluster stream generated on the fly
# (a 14 GiB disk, 3 clusters of 4 random, the 4th zero) piped into
# vma-encode, so no source image takes disk space; it is deleted after part 1.
# Ratios > 1 mean faster than the baseline.
# Usage: benches/serve.sh [WORKDIR]   (needs ~16 GiB free; python3, qemu-utils, zstd)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
made_work=""
if [ -n "${1:-}" ]; then work=$1; else work=$(mktemp -d /var/tmp/vma-serve-bench.XXXXXX); made_work=1; fi
mkdir -p "$work"
cd "$work"
work=$(pwd)
pids=()
# Everything it writes (GiBs) goes, however it ends.
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  cd /
  rm -rf "$work"/big.vma* "$work"/out-* "$work"/*.qcow2 "$work"/cache "$work"/*.sock "$work"/fifo \
    "$work"/disk.raw "$work"/R.vma "$work"/R0.vma "$work"/R.vma.zst "$work"/reads.txt "$work"/serve.log
  if [ -n "$made_work" ]; then rmdir "$work" 2>/dev/null || true; fi
}
trap cleanup EXIT

. "$root/scripts/vma-bin.sh"
bin=$VMA_BIN
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1048576 }'; }
drop_cache() { dd if="$1" iflag=nocache count=0 status=none; }
# best of 3 wall-clock seconds of a shell command (its output discarded)
best() {
  local best="" s e t
  for _ in 1 2 3; do
    s=$(now); bash -c "$1" >/dev/null; e=$(now); t=$(secs "$s" "$e")
    if [ -z "$best" ] || awk -v t="$t" -v b="$best" 'BEGIN { exit !(t < b) }'; then best=$t; fi
  done
  echo "$best"
}

# Starts `vma-decode serve ARGS…` on $work/serve.sock; returns when it
# listens (its URI line arrives through a FIFO), sets $serve_pid.
start_serve() {
  rm -f fifo serve.sock; mkfifo fifo
  "$bin/vma-decode" serve --socket "$work/serve.sock" "$@" > fifo 2>> serve.log &
  serve_pid=$!
  pids+=("$serve_pid")
  local uri
  read -r uri < fifo
}
stop_serve() { kill "$serve_pid"; wait "$serve_pid" || true; }
# Seconds from start to listening.
time_serve() { local s e; s=$(now); start_serve "$@"; e=$(now); stop_serve; secs "$s" "$e"; }

echo "== serve benchmark ($(nproc) cores, shared machine: figures are indicative)"

# --- 1. index time of a >= 10 GiB plain archive -------------------------------
python3 - <<'PY' | "$bin/vma-encode" --uuid 00000000-0000-0000-0000-00000000000b --ctime 0 -o big.vma -
import os, struct, sys, zlib
out = sys.stdout.buffer
size = 14 << 30
clusters = size >> 16
name = b"drive-scsi0"
pre = b"VMACSTRM" + struct.pack(">HHqH", 1, 0, 0, 1) + struct.pack(">QH", size, len(name)) + name
out.write(pre + struct.pack(">I", zlib.crc32(pre)))
pool = [bytearray(os.urandom(65536)) for _ in range(64)]
for n in range(clusters):
    if n % 4 == 3:
        head = struct.pack(">BBHII", 0x43, 1, 0, n, 0)
        out.write(head + struct.pack(">I", zlib.crc32(head)))
        continue
    body = pool[n % 64]
    body[0:8] = struct.pack(">Q", n + 1)  # every cluster different
    head = struct.pack(">BBHII", 0x43, 1, 0xffff, n, 65536)
    out.write(head)
    out.write(body)
    out.write(struct.pack(">I", zlib.crc32(body, zlib.crc32(head))))
end = struct.pack(">BBHII", 0x45, 0, 1, 0, 8) + struct.pack(">Q", clusters)
out.write(end + struct.pack(">I", zlib.crc32(end)))
PY
big_size=$(stat -c %s big.vma)
big_alloc=$(( $(stat -c %b big.vma) * $(stat -c %B big.vma) ))
echo "archive: $(mib "$big_size") MiB ($(mib "$big_alloc") MiB allocated on disk), a 14 GiB disk, $(( (14 << 14) )) clusters"
drop_cache big.vma
t_cold=$(time_serve big.vma)
t_warm=$(time_serve big.vma); t2=$(time_serve big.vma); t_warm=$(awk -v a="$t_warm" -v b="$t2" 'BEGIN { print (a < b) ? a : b }')
drop_cache big.vma
s=$(now); cat big.vma > /dev/null; e=$(now); t_cat_cold=$(secs "$s" "$e")
t_cat=$(best "cat big.vma")
t_verify=$(best "'$bin/vma-verify' -q big.vma")
start_serve --save-index big.vma; stop_serve
t_load=$(time_serve big.vma)
grep -q "index read from" serve.log
printf '  %-46s %8.3f s\n' "cat ARCHIVE > /dev/null (cold)" "$t_cat_cold"
printf '  %-46s %8.3f s\n' "cat ARCHIVE > /dev/null (warm)" "$t_cat"
printf '  %-46s %8.3f s\n' "vma-verify -q ARCHIVE (warm)" "$t_verify"
printf '  %-46s %8.3f s   ratio to cat (cold): %s\n' "serve: index, start to listening (cold)" "$t_cold" "$(ratio "$t_cat_cold" "$t_cold")"
printf '  %-46s %8.3f s   ratio to cat: %s, to vma-verify: %s   (target < 2 s)\n' "serve: index, start to listening (warm)" "$t_warm" "$(ratio "$t_cat" "$t_warm")" "$(ratio "$t_verify" "$t_warm")"
printf '  %-46s %8.3f s   (%s bytes of index)\n' "serve: saved index loaded, to listening" "$t_load" "$(stat -c %s big.vma.vmaidx)"
rm -f big.vma big.vma.vmaidx

# --- a 4 GiB disk for parts 2 and 3 -------------------------------------------
# 4 KiB blocks: 5 of 8 random, the rest zero; every 16th cluster all zero.
python3 - <<'PY'
import os
blk = 4096
with open("disk.raw", "wb") as f:
    for c in range(1 << 16):  # 65536 clusters of 64 KiB = 4 GiB
        if c % 16 == 15:
            f.write(bytes(16 * blk))
            continue
        rnd = os.urandom(10 * blk)
        parts = []
        for b in range(16):
            parts.append(rnd[(b % 10) * blk:(b % 10 + 1) * blk] if b % 8 < 5 else bytes(blk))
        f.write(b"".join(parts))
PY
rm -f R.vma R0.vma R.vma.zst
"$bin/vma-encode" --uuid 00000000-0000-0000-0000-00000000000c --ctime 0 -o R.vma drive-scsi0=disk.raw 2>/dev/null
"$bin/vma-encode" --uuid 00000000-0000-0000-0000-00000000000d --ctime 0 --no-data-checksums -o R0.vma drive-scsi0=disk.raw 2>/dev/null
zstd -q -T0 R.vma -o R.vma.zst
rm -f disk.raw
rm -rf out-x; "$bin/vma-decode" extract R.vma out-x >/dev/null
raw=out-x/disk-drive-scsi0.raw
echo "disk: 4 GiB, archive $(mib "$(stat -c %s R.vma)") MiB ($(mib "$(stat -c %s R.vma.zst)") MiB zstd)"

# --- 2. random 4 KiB reads ----------------------------------------------------
n_reads=20000
python3 - "$n_reads" > reads.txt <<'PY'
import random, sys
random.seed(11)
for _ in range(int(sys.argv[1])):
    print(f"read -q {random.randrange(1 << 20) * 4096} 4096")
PY
reads() { local s e; s=$(now); qemu-io -r -f raw "$1" < reads.txt > /dev/null; e=$(now); secs "$s" "$e"; }
cat R.vma R0.vma "$raw" > /dev/null
rm -f qemu.sock
qemu-nbd -r -f raw -k "$work/qemu.sock" -x drive-scsi0 -t --shared=4 "$raw" &
qnbd=$!; pids+=("$qnbd")
while [ ! -S qemu.sock ]; do sleep 0.1; done
t_q=$(reads "nbd+unix:///drive-scsi0?socket=$work/qemu.sock")
t_q2=$(reads "nbd+unix:///drive-scsi0?socket=$work/qemu.sock")
t_q=$(awk -v a="$t_q" -v b="$t_q2" 'BEGIN { print (a < b) ? a : b }')
kill "$qnbd"; wait "$qnbd" 2>/dev/null || true
uri="nbd+unix:///drive-scsi0?socket=$work/serve.sock"
start_serve R.vma
t_s1=$(reads "$uri"); t_s2=$(reads "$uri")
stop_serve
start_serve R0.vma
t_n=$(reads "$uri"); t_n2=$(reads "$uri")
t_n=$(awk -v a="$t_n" -v b="$t_n2" 'BEGIN { print (a < b) ? a : b }')
stop_serve
rm -f R0.vma
ops() { awk -v n="$n_reads" -v t="$1" 'BEGIN { printf "%.0f", n / t }'; }
echo "random 4 KiB reads, queue depth 1 (qemu-io, $n_reads reads over the 4 GiB disk, page cache warm):"
printf '  %-52s %7s reads/s\n' "qemu-nbd serving the extracted raw image" "$(ops "$t_q")"
printf '  %-52s %7s reads/s   ratio to qemu-nbd: %s\n' "serve, data checksums, 1st pass (verifies extents)" "$(ops "$t_s1")" "$(ratio "$t_q" "$t_s1")"
printf '  %-52s %7s reads/s   ratio to qemu-nbd: %s\n' "serve, data checksums, 2nd pass (verified)" "$(ops "$t_s2")" "$(ratio "$t_q" "$t_s2")"
printf '  %-52s %7s reads/s   ratio to qemu-nbd: %s\n' "serve, no data checksums (as Proxmox's archives)" "$(ops "$t_n")" "$(ratio "$t_q" "$t_n")"
rm -rf out-x

# --- 3. qemu-img convert to qcow2 ---------------------------------------------
alloc() { local t=0 f; for f in "$@"; do [ -e "$f" ] && t=$((t + $(stat -c %b "$f") * $(stat -c %B "$f"))); done; echo "$t"; }
mkdir -p cache
sync
echo "qemu-img convert -O qcow2 of the 4 GiB disk (time; peak disk space written, archive not counted):"
# extract, then convert: the raw image + the qcow2 (kept as the reference)
s=$(now); rm -rf out-e; "$bin/vma-decode" extract R.vma out-e >/dev/null
qemu-img convert -f raw -O qcow2 out-e/disk-drive-scsi0.raw via-extract.qcow2; sync via-extract.qcow2; e=$(now)
t_ep=$(secs "$s" "$e"); d_ep=$(alloc out-e/disk-drive-scsi0.raw via-extract.qcow2); rm -rf out-e
s=$(now); rm -rf out-e; "$bin/vma-decode" extract R.vma.zst out-e >/dev/null
qemu-img convert -f raw -O qcow2 out-e/disk-drive-scsi0.raw via-extract-z.qcow2; sync via-extract-z.qcow2; e=$(now)
t_ez=$(secs "$s" "$e"); d_ez=$(alloc out-e/disk-drive-scsi0.raw via-extract-z.qcow2); rm -rf out-e via-extract-z.qcow2
# via serve, plain archive
s=$(now); start_serve R.vma
qemu-img convert -f raw -O qcow2 "$uri" via-serve.qcow2; sync via-serve.qcow2; e=$(now); stop_serve
t_sp=$(secs "$s" "$e"); d_sp=$(alloc via-serve.qcow2)
qemu-img compare -q via-serve.qcow2 via-extract.qcow2; rm -f via-serve.qcow2
# via serve, compressed archive: the cache (decompressed archive) + the qcow2
: > serve.log
s=$(now); start_serve --cache "$work/cache" R.vma.zst
qemu-img convert -f raw -O qcow2 "$uri" via-serve-z.qcow2; sync via-serve-z.qcow2; e=$(now); stop_serve
t_sz=$(secs "$s" "$e")
cache_bytes=$(sed -n 's/.*decompressed \([0-9]*\) bytes and indexed.*/\1/p' serve.log)
d_sz=$(( $(alloc via-serve-z.qcow2) + cache_bytes ))
qemu-img compare -q via-serve-z.qcow2 via-extract.qcow2; rm -f via-serve-z.qcow2 via-extract.qcow2
printf '  %-40s %8.3f s %7s MiB peak\n' "plain: extract, then convert (baseline)" "$t_ep" "$(mib "$d_ep")"
printf '  %-40s %8.3f s %7s MiB peak   time ratio: %s, space ratio: %s\n' "plain: convert via serve" "$t_sp" "$(mib "$d_sp")" "$(ratio "$t_ep" "$t_sp")" "$(ratio "$d_ep" "$d_sp")"
printf '  %-40s %8.3f s %7s MiB peak\n' "zstd: extract, then convert (baseline)" "$t_ez" "$(mib "$d_ez")"
printf '  %-40s %8.3f s %7s MiB peak   time ratio: %s, space ratio: %s\n' "zstd: convert via serve --cache" "$t_sz" "$(mib "$d_sz")" "$(ratio "$t_ez" "$t_sz")" "$(ratio "$d_ez" "$d_sz")"
rm -f R.vma R0.vma R.vma.zst reads.txt serve.log
