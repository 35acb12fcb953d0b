#!/usr/bin/env bash
# Live backup of disks in use: serve two disks with cbw-tap, keep writing to
# them with qemu-io while `cbw-tap backup | vma-encode - | zstd` runs, then
# verify the archive from a pipe, restore it, and check that it holds the
# disks exactly as they were at the backup instant while the live disks hold
# every write made during the backup.
#
#   examples/live-backup.sh [WORKDIR]
#
# Needs qemu-io (qemu-utils), zstd and python3. Uses the binaries in $VMA_BIN,
# else builds them (scripts/vma-bin.sh: release, in cargo's target directory,
# CARGO_TARGET_DIR included). Without WORKDIR it works in a temporary
# directory and removes it at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/vma-bin.sh"
if [ -n "${1:-}" ]; then work=$1 temp_work=""; else work=$(mktemp -d) temp_work=$work; fi
mkdir -p "$work"
trap '[ -z "$temp_work" ] || rm -rf "$temp_work"' EXIT
cd "$work"
rm -rf restored instant vm.vma.zst nbd.sock nbd.sock.ctl

echo "== two guest disks: random data, holes"
rm -f scsi0.raw scsi1.raw
truncate -s 48M scsi0.raw
head -c 24M /dev/urandom | dd of=scsi0.raw conv=notrunc status=none
truncate -s 16M scsi1.raw
head -c 4M /dev/urandom | dd of=scsi1.raw bs=1M seek=8 conv=notrunc status=none
printf 'name: live\nmemory: 1024\nscsi0: local:vm-100-disk-0,size=48M\nscsi1: local:vm-100-disk-1,size=16M\n' > qemu-server.conf

echo "== serve them over NBD"
cbw-tap serve --socket "$work/nbd.sock" drive-scsi0=scsi0.raw drive-scsi1=scsi1.raw &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; [ -z "$temp_work" ] || rm -rf "$temp_work"' EXIT
for _ in $(seq 500); do [ -S nbd.sock ] && [ -S nbd.sock.ctl ] && break; sleep 0.02; done
uri() { echo "nbd+unix:///$1?socket=$work/nbd.sock"; }
qemu-io -f raw "$(uri drive-scsi0)" -c 'write -P 0x11 0 1M' > /dev/null

echo "== the disks at the backup instant (no writer runs yet)"
cp --sparse=always scsi0.raw instant-scsi0.raw
cp --sparse=always scsi1.raw instant-scsi1.raw

echo "== back up while the guest writes: cbw-tap backup | vma-encode - | zstd"
( cbw-tap backup --control nbd.sock.ctl --buffer 1M --post 'touch instant' \
    | vma-encode -c qemu-server.conf - | zstd -q -c > vm.vma.zst ) &
pipeline=$!
for _ in $(seq 500); do [ -e instant ] && break; sleep 0.01; done
qemu-io -f raw "$(uri drive-scsi0)" \
  -c 'write -P 0xaa 0 64k' -c 'write -P 0xbb 40M 1M' -c 'write -z 20M 2M' > /dev/null
qemu-io -f raw "$(uri drive-scsi1)" -c 'write -P 0xcc 8M 128k' -c 'discard 0 64k' > /dev/null
wait $pipeline
ls -l vm.vma.zst

echo "== verify from a pipe"
zstd -dc vm.vma.zst | vma-verify -

echo "== the live disks hold the writes made during the backup"
qemu-io -f raw "$(uri drive-scsi0)" -c 'read -P 0xaa 0 64k' -c 'read -P 0xbb 40M 1M' \
  -c 'read -P 0 20M 2M' > /dev/null
qemu-io -f raw "$(uri drive-scsi1)" -c 'read -P 0xcc 8M 128k' > /dev/null

echo "== restore and compare with the instant"
zstd -dc vm.vma.zst | vma-decode extract - restored
cmp instant-scsi0.raw restored/disk-drive-scsi0.raw
cmp instant-scsi1.raw restored/disk-drive-scsi1.raw
cmp qemu-server.conf restored/qemu-server.conf
echo "live-backup: OK (the archive holds the disks as they were at the instant)"
