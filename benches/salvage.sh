#!/usr/bin/env bash
# Salvage resynchronisation over 64 MiB of garbage (issue 8, item 7).
# Each archive: a header, 64 MiB of garbage where extents should be, then one
# good extent (16 clusters). `vma-decode extract --salvage` must skip the
# garbage and find the extent; its speed over the garbage is printed in MB/s
# and as a ratio to `cat` of the same archive. Kinds of garbage:
#   zeros, random            nothing that looks like an extent
#   magic                    "VMAE" repeated: a magic number every 4 bytes
#   magic+uuid               magic, zero fields and the archive's uuid every 24 bytes
#   bad-header               one well-formed extent header with a wrong MD5, repeated
#   distinct-headers         well-formed headers with wrong MD5s, each different, every 512 bytes
#   dense-undeclared         overlapping candidates every 32 bytes that pass the magic,
#                            reserved, uuid and block count checks, each different, but
#                            whose slots name a device the archive does not declare
#   dense-adversarial        the same over an archive that declares that device (id 69,
#                            128 clusters): its slots name clusters inside it, but the
#                            next candidates' magic gives them a nonzero reserved byte,
#                            which no writer writes: ruled out without an MD5
# Usage: benches/salvage.sh [WORKDIR]
# Env:   VMA_BIN=DIR (default: cargo build --release); BASE_BIN=DIR to also
#        time another build (e.g. before a change) on the same archives.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/vma-bin.sh"
if [[ $# -ge 1 ]]; then work=$1; mkdir -p "$work"; else work=$(mktemp -d /var/tmp/vma-salvage.XXXXXX); trap 'rm -rf "$work"' EXIT; fi
uuid=01020300-0405-0607-0809-0a000b0c0d0e   # bytes 3 and 11 zero (see dense-adversarial)
head -c 1048576 /dev/urandom > "$work/img.raw"
"$VMA_BIN/vma-encode" --uuid "$uuid" --ctime 0 -o "$work/good.vma" "drive-scsi0=$work/img.raw"
# The same image as device 1 of 69: devices 2..68 of 512 bytes, device 69 of
# 8 MiB (zeros), which the dense-adversarial garbage names.
head -c 512 /dev/zero > "$work/tiny.raw"; head -c 8388608 /dev/zero > "$work/dev69.raw"
devs=("drive-scsi0=$work/img.raw")
for i in $(seq 1 67); do devs+=("drive-scsi$i=$work/tiny.raw"); done
devs+=("drive-scsi68=$work/dev69.raw")
"$VMA_BIN/vma-encode" --uuid "$uuid" --ctime 0 -o "$work/good69.vma" "${devs[@]}"
"$VMA_BIN/vma-decode" list "$work/good69.vma" | grep -q '^DEV: dev_id=69 size: 8388608 devname: drive-scsi68$' \
  || { echo "good69.vma: device 69 is not drive-scsi68" >&2; exit 1; }
python3 - "$work" <<'PY'
import os, sys, struct
work = sys.argv[1]
def split(name):
    good = open(os.path.join(work, name), "rb").read()
    hsize = struct.unpack(">I", good[56:60])[0]
    return good[:hsize], good[hsize:]
header, extent = split("good.vma")
header69, extent69 = split("good69.vma")
uuid = header[8:24]
assert uuid[3] == 0 and uuid[11] == 0
N = 64 << 20
def hdr(bc=0, slots=b"", md5=b"\x01" * 16):
    h = b"VMAE\0\0" + struct.pack(">H", bc) + uuid + md5 + slots
    return h + bytes(512 - len(h))
def dense():
    # 32-byte period: magic, 0, block count 112, uuid, 8 free bytes whose
    # 4th byte is 0 (a slot of no device). A candidate's slots lie in the
    # uuid (bytes 3 and 11 zero: no device), the free bytes (no device) and
    # the next candidates' magic and block count: 14 slots of mask 0x564d
    # ("VM", 8 blocks), device 0x45 ("E", 69), cluster 112. 112 blocks: its
    # block count is right.
    out = bytearray()
    rnd = os.urandom(N // 4)
    for i in range(N // 32):
        free = bytearray(rnd[8 * i:8 * i + 8]); free[3] = 0
        out += b"VMAE\0\0" + struct.pack(">H", 112) + uuid + free
    return bytes(out)
kinds = {
    "zeros": bytes(N),
    "random": os.urandom(N),
    "magic": b"VMAE" * (N // 4),
    "magic+uuid": (b"VMAE\0\0\0\0" + uuid) * (N // 24),
    "bad-header": hdr() * (N // 512),
    "distinct-headers": b"".join(hdr(md5=os.urandom(16)) for _ in range(N // 512)),
    "dense-undeclared": dense(),
}
for name, junk in kinds.items():
    with open(os.path.join(work, name + ".vma"), "wb") as f:
        f.write(header + junk[:N] + extent)
with open(os.path.join(work, "dense-adversarial.vma"), "wb") as f:
    f.write(header69 + dense() + extent69)
PY
best() {  # best of 3 wall seconds of a command (exit status ignored)
  local best="" s e t
  for _ in 1 2 3; do
    s=$(date +%s.%N); bash -c "$1" >/dev/null 2>&1 || true; e=$(date +%s.%N)
    t=$(echo "$e - $s" | bc -l)
    if [[ -z $best ]] || (( $(echo "$t < $best" | bc -l) )); then best=$t; fi
  done
  echo "$best"
}
echo "== salvage resynchronisation over 64 MiB of garbage ($(nproc) cores; machine possibly shared; best of 3)"
printf '%-20s %8s %9s %8s %7s %s\n' garbage cat_s salvage_s MB/s ratio "${BASE_BIN:+base_s base_MB/s}"
for k in zeros random magic magic+uuid bad-header distinct-headers dense-undeclared dense-adversarial; do
  a=$work/$k.vma
  "$VMA_BIN/vma-decode" extract --salvage "$a" "$work/out-$k" >/dev/null 2>&1 && { echo "$k: salvage found nothing wrong?" >&2; exit 1; } || [[ $? == 4 ]] || { echo "$k: salvage failed" >&2; exit 1; }
  cmp -s <(head -c 1048576 "$work/out-$k/disk-drive-scsi0.raw") "$work/img.raw" || { echo "$k: extent after the garbage not recovered" >&2; exit 1; }
  rm -rf "$work/out-$k"
  c=$(best "cat '$a' > /dev/null")
  s=$(best "rm -rf '$work/o'; '$VMA_BIN/vma-decode' extract --salvage '$a' '$work/o'")
  extra=""
  if [[ -n ${BASE_BIN:-} ]]; then
    b=$(best "rm -rf '$work/o'; '$BASE_BIN/vma-decode' extract --salvage '$a' '$work/o'")
    extra=$(printf '%6.2f %9.0f' "$b" "$(echo "67.108864 / $b" | bc -l)")
  fi
  printf '%-20s %8.3f %9.3f %8.0f %7.2f %s\n' "$k" "$c" "$s" "$(echo "67.108864 / $s" | bc -l)" "$(echo "$c / $s" | bc -l)" "$extra"
done
rm -rf "$work/o"
