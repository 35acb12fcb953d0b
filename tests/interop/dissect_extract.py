#!/usr/bin/env python3
"""Extract a VMA archive with dissect.hypervisor's independent VMA reader.

    dissect_extract.py ARCHIVE OUTDIR

Writes OUTDIR/<devname>.raw for each device and OUTDIR/cfg-<name> for each
config, and prints one line per device: `DEV <id> <name> <size>`. Used by
tests/interop.rs to prove that archives written by vma-encode are read the
same way by another implementation (pip package dissect.hypervisor, whose
VMA reader exists up to version 3.15).
"""
import os
import sys

from dissect.hypervisor.backup.vma import VMA


def main():
    archive, outdir = sys.argv[1], sys.argv[2]
    os.makedirs(outdir, exist_ok=True)
    with open(archive, "rb") as fh:
        vma = VMA(fh)
        for name, data in vma.configs().items():
            with open(os.path.join(outdir, "cfg-" + name), "wb") as f:
                f.write(data)
        for dev in vma.devices():
            stream = dev.open()
            with open(os.path.join(outdir, dev.name + ".raw"), "wb") as f:
                remaining = dev.size
                while remaining:
                    chunk = stream.read(min(remaining, 1 << 20))
                    if not chunk:
                        raise SystemExit(f"{dev.name}: short read")
                    f.write(chunk)
                    remaining -= len(chunk)
            print(f"DEV {dev.id} {dev.name} {dev.size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
