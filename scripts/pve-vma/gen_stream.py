#!/usr/bin/env python3
"""Write a vma-tools cluster stream, version 1 (docs/CLUSTER-STREAM.md in
vma-tools), from raw images, for check.sh: clusters of all devices in a
seeded shuffled order (or in order), optionally a `vmstate` device sent in
order from cluster 0.

Usage: gen_stream.py OUT --time T [--seed N] [--order shuffle|seq]
                     NAME=IMAGE ... [--vmstate FILE]
"""
import argparse
import random
import struct
import zlib

CLUSTER = 65536
BLOCK = 4096


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--time", type=int, required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--order", choices=["shuffle", "seq"], default="shuffle")
    ap.add_argument("--vmstate")
    ap.add_argument("devs", nargs="*")
    a = ap.parse_intermixed_args()
    devs = []
    for d in a.devs:
        name, path = d.split("=", 1)
        data = open(path, "rb").read()
        size = (len(data) + 511) // 512 * 512
        devs.append((name, data + bytes(size - len(data)), size))
    if a.vmstate:
        data = open(a.vmstate, "rb").read()
        devs.append(("vmstate", data, len(data)))
    pre = b"VMACSTRM" + struct.pack(">HHqH", 1, 0, a.time, len(devs))
    for name, _, size in devs:
        n = name.encode()
        pre += struct.pack(">QH", size, len(n)) + n
    pre += struct.pack(">I", zlib.crc32(pre))
    work = []
    for i, (name, data, size) in enumerate(devs):
        if name == "vmstate":
            continue
        work += [(i, c) for c in range((size + CLUSTER - 1) // CLUSTER)]
    if a.order == "shuffle":
        random.Random(a.seed).shuffle(work)
    # vmstate: in order, interleaved with the rest
    if a.vmstate:
        vi = len(devs) - 1
        vn = (len(devs[vi][1]) + CLUSTER - 1) // CLUSTER
        step = max(1, len(work) // (vn + 1))
        for k in range(vn):
            work.insert(min(len(work), (k + 1) * step + k), (vi, k))
    counts = [0] * len(devs)

    def record(t, fa, fb, fc, body):
        h = struct.pack(">BBHII", t, fa, fb, fc, len(body)) + body
        return h + struct.pack(">I", zlib.crc32(h))

    with open(a.out, "wb") as f:
        f.write(pre)
        for i, c in work:
            data = devs[i][1]
            chunk = data[c * CLUSTER:(c + 1) * CLUSTER]
            chunk += bytes(CLUSTER - len(chunk))
            mask, body = 0, b""
            for b in range(16):
                blk = chunk[b * BLOCK:(b + 1) * BLOCK]
                if blk.count(0) != BLOCK:
                    mask |= 1 << b
                    body += blk
            f.write(record(0x43, i + 1, mask, c, body))
            counts[i] += 1
        f.write(record(0x45, 0, len(devs), 0, b"".join(struct.pack(">Q", n) for n in counts)))


main()
