#!/usr/bin/env bash
# A backup as a disk, without extracting it: back up a disk that holds an
# ext4 file system into a compressed archive, serve the archive read-only
# over NBD, convert the disk to qcow2 straight from it, and get one file out
# of the file system through nbdfuse (where FUSE works) and qemu-nbd -c
# (where the host has /dev/nbd*), skipping each with its reason elsewhere.
#
#   examples/serve.sh [WORKDIR]
#
# Uses the binaries in $VMA_BIN, else builds them (scripts/vma-bin.sh: release,
# in cargo's target directory, CARGO_TARGET_DIR included). Without WORKDIR it
# works in a temporary directory and removes it at the end.
# Needs qemu-utils, libnbd-bin (nbdfuse), e2fsprogs (mkfs.ext4, debugfs), zstd.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/vma-bin.sh"
if [ -n "${1:-}" ]; then work=$1 temp_work=""; else work=$(mktemp -d) temp_work=$work; fi
mkdir -p "$work"
cd "$work"
work=$(pwd)

server=""
mounted=""
cleanup() {
  if [ -n "$mounted" ]; then fusermount3 -u "$mounted" 2>/dev/null || umount "$mounted" 2>/dev/null || true; fi
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  [ -z "$temp_work" ] || rm -rf "$temp_work"
}
trap cleanup EXIT

echo "== a 64 MiB guest disk with an ext4 file system (made without mounting anything)"
rm -rf fs-root disk.raw
mkdir -p fs-root/etc fs-root/srv
echo "restored-from-backup" > fs-root/etc/hostname
head -c 3M /dev/urandom > fs-root/srv/data.bin
truncate -s 64M disk.raw
mkfs.ext4 -q -F -d fs-root disk.raw
printf 'name: demo\nscsi0: local:vm-100-disk-0,size=64M\n' > qemu-server.conf

echo "== back up: vma-encode | zstd"
vma-encode -c qemu-server.conf drive-scsi0=disk.raw | zstd -q -c > vm.vma.zst

echo "== serve the backup (compressed, so decompressed once into an unnamed file in --cache)"
rm -f vm.sock uris
mkfifo uris
vma-decode serve --socket "$work/vm.sock" --cache "$work" vm.vma.zst > uris &
server=$!
# The URI line comes once the server listens.
read -r uri < uris
echo "   $uri"

echo "== qemu-img convert to qcow2 straight from the backup (no raw copy)"
rm -f vm.qcow2
qemu-img convert -f raw -O qcow2 "$uri" vm.qcow2
qemu-img compare -f raw -F qcow2 disk.raw vm.qcow2
echo "   holes stay holes: $(qemu-img map --output=json "$uri" | grep -c '"data": true') data extents in 64 MiB"

echo "== file-level restore through nbdfuse"
fuse_skip=""
if ! command -v nbdfuse >/dev/null; then
  fuse_skip="nbdfuse is not installed (libnbd-bin)"
elif [ ! -c /dev/fuse ]; then
  fuse_skip="no /dev/fuse on this host"
else
  rm -rf mnt nbdfuse.pid
  mkdir mnt
  nbdfuse -r -P "$work/nbdfuse.pid" mnt "$uri" 2> nbdfuse.err &
  fuse=$!
  # Ready when it has written its pid file; or it failed and is gone.
  while [ ! -s nbdfuse.pid ] && kill -0 "$fuse" 2>/dev/null; do sleep 0.1; done
  if [ -s nbdfuse.pid ]; then
    mounted="$work/mnt"
    got=$(debugfs -R "cat /etc/hostname" mnt/nbd 2>/dev/null)
    [ "$got" = "restored-from-backup" ] || { echo "debugfs read '$got'" >&2; exit 1; }
    echo "   debugfs -R 'cat /etc/hostname' mnt/nbd: $got"
    # The kernel can mount it too, through a loop device, where there is one.
    if ! command -v losetup >/dev/null; then
      echo "   SKIP losetup + mount: losetup is not installed"
    elif loop=$(losetup -r -f --show mnt/nbd 2>/dev/null); then
      mkdir -p fsmnt
      if mount -o ro,noload "$loop" fsmnt 2>/dev/null; then
        cmp fsmnt/srv/data.bin fs-root/srv/data.bin
        echo "   losetup + mount -o ro: srv/data.bin identical to the original"
        umount fsmnt
      else
        echo "   SKIP mount: the kernel refused to mount $loop here"
      fi
      losetup -d "$loop"
    else
      echo "   SKIP losetup + mount: no free loop device on this host"
    fi
    fusermount3 -u mnt 2>/dev/null || umount mnt
    mounted=""
    wait "$fuse" || true
  else
    wait "$fuse" || true
    fuse_skip="nbdfuse could not mount here: $(tr '\n' ' ' < nbdfuse.err)"
  fi
fi
[ -z "$fuse_skip" ] || echo "   SKIP nbdfuse: $fuse_skip"

echo "== a block device through qemu-nbd -c"
if [ -b /dev/nbd0 ]; then
  qemu-nbd -c /dev/nbd0 -r -f raw "$uri"
  got=$(debugfs -R "cat /etc/hostname" /dev/nbd0 2>/dev/null)
  qemu-nbd -d /dev/nbd0 >/dev/null
  [ "$got" = "restored-from-backup" ] || { echo "debugfs read '$got'" >&2; exit 1; }
  echo "   qemu-nbd -c /dev/nbd0, debugfs: $got"
else
  echo "   SKIP qemu-nbd -c: no /dev/nbd* on this host (the nbd kernel module is not loaded: modprobe nbd)"
fi

echo "== stop the server (SIGTERM: socket removed, exit 0)"
kill "$server"
wait "$server"
server=""
[ ! -e vm.sock ]
echo "serve: OK (converted without a raw copy; file read from the backup)"
