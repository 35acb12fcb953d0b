#!/usr/bin/env bash
# Restore a backup: verify the archive first, then extract it, or write one
# of its disks onto a block device or image file.
#
#   examples/restore.sh ARCHIVE DIR                    # DIR/disk-NAME.raw…, the configs
#   examples/restore.sh ARCHIVE --disk DEVNAME TARGET  # one disk onto TARGET (in place)
#
# ARCHIVE may be compressed (.vma.zst, .vma.gz, .vma.lzo) or '-' for
# standard input (then it is read once, not verified first: extract makes
# every check anyway and keeps nothing unless all passed). TARGET must be
# at least the disk's size if it is a block device; an image file is
# created or replaced (sparse). Stop whatever uses it first (the VM, cbw-tap). Prints
# what was restored; exits with the tools' exit code (docs: README "Exit
# codes"). Uses the binaries in $VMA_BIN or on PATH.
set -euo pipefail
if [ -n "${VMA_BIN:-}" ]; then PATH="$VMA_BIN:$PATH"; fi
usage() { echo "restore: usage: restore.sh ARCHIVE DIR | restore.sh ARCHIVE --disk DEVNAME TARGET" >&2; exit 2; }
[ $# -ge 2 ] || usage
archive=$1
shift

if [ "$archive" != - ]; then
  echo "== verify $archive"
  vma-verify "$archive"
fi

if [ "$1" = --disk ]; then
  [ $# = 3 ] || usage
  dev=$2 target=$3
  echo "== $dev -> $target"
  # In order through extract's reorder buffer; zero blocks skipped where the
  # target is a file (holes), written where it is a device.
  if [ -b "$target" ]; then
    vma-decode extract --stdout "$dev" "$archive" | dd of="$target" bs=1M iflag=fullblock conv=fsync status=none
  else
    # An image file is rewritten from empty, so zero blocks become holes.
    vma-decode extract --stdout "$dev" "$archive" | dd of="$target" bs=64k iflag=fullblock conv=sparse,fsync status=none
  fi
  echo "restore: $dev written to $target"
else
  [ $# = 1 ] || usage
  dir=$1
  echo "== extract into $dir"
  vma-decode extract "$archive" "$dir" > /dev/null
  for f in "$dir"/*; do
    printf 'restore: %s (%s bytes)\n' "$f" "$(stat -c %s "$f")"
  done
fi
