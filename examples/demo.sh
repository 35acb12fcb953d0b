#!/usr/bin/env bash
# The main job end to end on a generated disk: back it up into a compressed
# VMA archive, verify the archive from a pipe, restore it, compare.
#
#   examples/demo.sh [WORKDIR]
#
# Uses the binaries in $VMA_BIN, else builds them (scripts/vma-bin.sh: release,
# in cargo's target directory, CARGO_TARGET_DIR included). Without WORKDIR it
# works in a temporary directory and removes it at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/vma-bin.sh"
if [ -n "${1:-}" ]; then work=$1 temp_work=""; else work=$(mktemp -d) temp_work=$work; fi
mkdir -p "$work"
trap '[ -z "$temp_work" ] || rm -rf "$temp_work"' EXIT
cd "$work"

echo "== a 64 MiB guest disk: random data, zero blocks, holes"
rm -f disk.raw
truncate -s 64M disk.raw
head -c 8M /dev/urandom | dd of=disk.raw conv=notrunc status=none
head -c 3M /dev/urandom | dd of=disk.raw bs=1M seek=40 conv=notrunc status=none
printf 'tail' | dd of=disk.raw bs=1 seek=$((64 * 1048576 - 4)) conv=notrunc status=none
printf 'name: demo\nmemory: 1024\nscsi0: local:vm-100-disk-0,size=64M\n' > qemu-server.conf

echo "== back up: vma-encode | zstd"
vma-encode -c qemu-server.conf drive-scsi0=disk.raw | zstd -q -c > vm.vma.zst
ls -l vm.vma.zst

echo "== verify from a pipe"
zstd -dc vm.vma.zst | vma-verify -

echo "== list (reads only the header, so zstd may see a closed pipe: not an error)"
vma-decode list <(zstd -dc vm.vma.zst)

echo "== restore and compare"
rm -rf restored
zstd -dc vm.vma.zst | vma-decode extract - restored
cmp disk.raw restored/disk-drive-scsi0.raw
cmp qemu-server.conf restored/qemu-server.conf
echo "demo: OK (restored disk and config are identical)"
