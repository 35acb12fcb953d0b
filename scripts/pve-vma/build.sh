#!/usr/bin/env bash
# Builds Proxmox's own `vma` tool as an external test peer for
# scripts/pve-vma/check.sh. Nothing of it goes into vma-tools: the sources
# are downloaded, patched and built outside the checkout.
#
# What it builds: upstream QEMU (Debian's orig tarball, by default 10.0.2
# from bookworm-backports' deb-src) with only pve-qemu's
# debian/patches/pve/0026-PVE-Backup-add-vma-backup-format-code.patch (the
# patch adding vma.c, vma-reader.c and vma-writer.c), configured for tools
# only, and just the `vma` target (about 4 minutes on 2 cores). Built so on
# 2026-12-03 with pve-qemu b43212837ac3 ("bump version to 11.0.0-2"): the
# patch applies with `patch -p1` (block/meson.build with fuzz 1: its
# context line 'zeroinit.c' comes from pve patch 0019, not applied).
#
# Usage: scripts/pve-vma/build.sh
# Env:   PVE_VMA_DIR   where to work and leave bin/vma (default /var/tmp/pve-vma)
#        PVE_QEMU      a pve-qemu git directory or URL (default
#                      https://git.proxmox.com/git/pve-qemu.git)
#        PVE_QEMU_REV  its revision (default b43212837ac35b81a338aa9c21fb5b936a3cfe96)
#        QEMU_VERSION  Debian's upstream QEMU version (default 10.0.2)
# Needs root for apt (the build dependencies and a deb-src line).
set -euxo pipefail
dir=${PVE_VMA_DIR:-/var/tmp/pve-vma}
pve=${PVE_QEMU:-https://git.proxmox.com/git/pve-qemu.git}
rev=${PVE_QEMU_REV:-b43212837ac35b81a338aa9c21fb5b936a3cfe96}
ver=${QEMU_VERSION:-10.0.2}
patch=debian/patches/pve/0026-PVE-Backup-add-vma-backup-format-code.patch
mkdir -p "$dir" && cd "$dir"

# 1. Build dependencies and QEMU's orig tarball (the .dsc is not needed).
export DEBIAN_FRONTEND=noninteractive
codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
list=/etc/apt/sources.list.d/vma-tools-pve-vma-src.list
[ -e "$list" ] || echo "deb-src http://deb.debian.org/debian ${codename}-backports main" >"$list"
apt-get update -qq
apt-get install -y -qq --no-install-recommends build-essential ninja-build python3-venv \
  libglib2.0-dev uuid-dev zlib1g-dev libpixman-1-dev pkg-config bison flex libzstd-dev >/dev/null
tarball=qemu_${ver}+ds.orig.tar.xz
[ -f "$tarball" ] || apt-get source --download-only qemu || [ -f "$tarball" ]
rm -rf "qemu-$ver" && tar xf "$tarball"

# 2. Only the vma patch.
if [ -d "$pve" ]; then
  git --git-dir="$pve" show "$rev:$patch" >vma.patch
else
  rm -rf pve-qemu && git clone -q --no-checkout "$pve" pve-qemu
  git -C pve-qemu show "$rev:$patch" >vma.patch
fi
(cd "qemu-$ver" && patch -p1 <../vma.patch)

# 3. The +ds tarball has no python/wheels: meson from PyPI in a venv.
[ -x py/bin/meson ] || { python3 -m venv py && py/bin/pip install -q meson==1.5.0 pycotap==1.3.1; }

# 4. Tools only; --disable-install-blobs as +ds has no pc-bios blobs.
mkdir "qemu-$ver/build" && cd "qemu-$ver/build"
nice -n 10 ../configure --python="$dir/py/bin/python3" --without-default-features \
  --disable-system --disable-user --enable-tools --disable-docs --disable-werror \
  --disable-rust --disable-install-blobs
nice -n 10 ninja -j2 vma
mkdir -p "$dir/bin" && cp vma "$dir/bin/vma"
echo "built $dir/bin/vma"
