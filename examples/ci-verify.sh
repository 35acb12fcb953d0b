#!/usr/bin/env bash
# Verify every archive in a directory, for CI or monitoring: plain and
# compressed ones alike (*.vma, *.vma.zst, *.vma.gz, *.vma.lzo), one JSON
# summary line on stdout, exit 0 only if every archive is sound.
#
#   examples/ci-verify.sh DIR
#
# The summary: {"directory":DIR,"archives":N,"ok":N,"damaged":N,"error":N,
# "results":[…]} where each result is vma-verify's --json object for one
# archive (fields in vma-verify --help: archive, status ok|damaged|error,
# uuid, ctime, devices, …, error). Problems also go to stderr, one line each
# (vma-verify: ARCHIVE: PROBLEM). Exit code: vma-verify's worst (1 damaged,
# 3 unreadable), 2 if DIR holds no archive or is not a directory.
# Uses the binaries in $VMA_BIN or on PATH, and python3 for the summary.
set -uo pipefail
if [ -n "${VMA_BIN:-}" ]; then PATH="$VMA_BIN:$PATH"; fi
[ $# = 1 ] || { echo "ci-verify: usage: ci-verify.sh DIR" >&2; exit 2; }
dir=$1
[ -d "$dir" ] || { echo "ci-verify: $dir: not a directory" >&2; exit 2; }
mapfile -t archives < <(find "$dir" -maxdepth 1 -type f \
  \( -name '*.vma' -o -name '*.vma.zst' -o -name '*.vma.gz' -o -name '*.vma.lzo' \) | sort)
if [ ${#archives[@]} = 0 ]; then
  echo "ci-verify: $dir: no archives (*.vma, *.vma.zst, *.vma.gz, *.vma.lzo)" >&2
  exit 2
fi
results=$(vma-verify --json "${archives[@]}")
code=$?
DIR="$dir" python3 -c '
import json, os, sys
results = [json.loads(line) for line in sys.stdin if line.strip()]
count = lambda s: sum(1 for r in results if r["status"] == s)
print(json.dumps({"directory": os.environ["DIR"], "archives": len(results),
                  "ok": count("ok"), "damaged": count("damaged"), "error": count("error"),
                  "results": results}, separators=(",", ":")))
' <<<"$results" || exit 3
exit $code
