#!/usr/bin/env bash
# cbw-tap benchmark (issue 4), in one run on the same image, page cache warm:
#
# 1. NBD throughput, cbw-tap vs qemu-nbd serving the same raw image over a
#    Unix socket, with `qemu-img bench` and identical parameters:
#    64 KiB and 4 KiB requests, read and write, queue depth 16.
#    Ratio = cbw-tap / qemu-nbd (> 1: cbw-tap is faster). No backup runs.
# 2. Guest write latency (4 KiB writes at random 4 KiB-aligned offsets, one
#    at a time, timed by qemu-io per request): p50 and p99 without a backup,
#    then during a backup `cbw-tap backup | vma-encode - > /dev/null` (a
#    consumer that keeps up; most writes hit uncopied clusters and pay
#    the copy-before-write). Ratio = during / without. Only writes timed
#    while the backup runs count (rounds of $CHUNK, see rounds()); with
#    SIZE >= 2G a full-speed backup lasts long enough for most of them. Five backups: the
#    pipeline at full speed and normal priority (it takes both cores of a
#    2-core machine), the same confined to the last CPU (`--cpus N`, the
#    consumer under `taskset -c N`), the consumer at SCHED_IDLE (chrt --idle), the
#    consumer processes at nice 10, and the reader limited with --bwlimit
#    (default 256M per second, $BWLIMIT).
#    qemu-io opens the export with cache mode $LAT_CACHE (default
#    writeback: a write is answered once it is in the image's page cache;
#    writethrough, qemu-io's own default, adds an fdatasync to every write,
#    whose device latency varies by milliseconds and hides what the backup
#    costs). The image is read again before each scenario: proactive
#    reclaim (DAMON) drops cold pages, and a copy-before-write that reads
#    the disk measures the disk.
#
# 3. Live backup (issue 10): t(vma-encode IMG | cat) / t(cbw-tap backup |
#    vma-encode - | cat), both to /dev/null, page cache warm, median of
#    $LIVE_RUNS each, on a $LIVE_SIZE random image and a half-zero one
#    (every other MiB written with zeros): 1.0 = a live backup costs what
#    encoding the same disk from a file does. With the peak RSS of the
#    serve process, the backup client and vma-encode (/usr/bin/time %M,
#    /proc VmHWM for serve).
#
# Targets: throughput ratio >= 1.0; p99 during backup <= 2 x without (1.5 x
# in issue 10); live backup ratio >= 0.8.
#
# Usage: benches/cbw.sh [WORKDIR]     (needs ~5 GiB free; qemu-utils, python3)
# Env:   SIZE=2G (image size)  COUNT=20000 (requests per qemu-img bench run)
#        WRITES=3000 (timed writes per latency run, in qemu-io rounds of CHUNK=250)  RUNS=3 (best of, throughput)
#        BWLIMIT=256M  LIVE_SIZE=1G  LIVE_RUNS=3  LAT_CACHE=writeback
#        BIN=DIR: use the cbw-tap and vma-encode in DIR (e.g. an older
#        build, for before/after figures) instead of building them
#        BASE_BIN=DIR: the live section also measures the build in DIR,
#        round by round interleaved with BIN's (A/B on the same machine state)
#        SECTIONS="throughput latency live" (which to run)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /var/tmp/cbw-bench.XXXXXX)}
mkdir -p "$work"
SIZE=${SIZE:-2G}
COUNT=${COUNT:-20000}
WRITES=${WRITES:-3000}
CHUNK=${CHUNK:-250}
RUNS=${RUNS:-3}
BWLIMIT=${BWLIMIT:-256M}
LIVE_SIZE=${LIVE_SIZE:-1G}
LIVE_RUNS=${LIVE_RUNS:-3}
SECTIONS=${SECTIONS:-throughput latency live}
section() { case " $SECTIONS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if [ -n "${BIN:-}" ]; then VMA_BIN=$BIN; fi
. "$root/scripts/vma-bin.sh"
bin=$VMA_BIN
for t in qemu-img qemu-nbd qemu-io python3 /usr/bin/time chrt taskset; do
  command -v $t >/dev/null || { echo "needs $t (apt-get install qemu-utils python3)" >&2; exit 3; }
done

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
wait_sock() { for _ in $(seq 1000); do [ -S "$1" ] && return 0; sleep 0.01; done; echo "no socket $1" >&2; exit 3; }

img="$work/disk.raw"
if [ "$(stat -c %s "$img" 2>/dev/null)" != "$(numfmt --from=iec "$SIZE")" ]; then
  rm -f "$img"
  head -c "$SIZE" /dev/urandom > "$img"
fi
cat "$img" > /dev/null # warm the page cache

# ---------------------------------------------------------------- throughput
# best of $RUNS: prints MiB/s of `qemu-img bench` against URI
bench() { # uri size write?
  local best=0 out t
  for _ in $(seq "$RUNS"); do
    out=$(qemu-img bench -f raw -c "$COUNT" -d 16 -s "$2" $3 "$1" 2>&1)
    t=$(echo "$out" | sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p')
    best=$(awk -v b="$best" -v t="$t" -v n="$COUNT" -v s="$(numfmt --from=iec "$2")" \
      'BEGIN { v = n * s / 1048576 / t; print (v > b ? v : b) }')
  done
  echo "$best"
}

declare -A tap nbd
rm -f "$work/cbw.sock" "$work/cbw.sock.ctl" "$work/qemu.sock"
"$bin/cbw-tap" serve --socket "$work/cbw.sock" disk="$img" 2>"$work/serve.log" &
pids+=($!)
wait_sock "$work/cbw.sock.ctl"; wait_sock "$work/cbw.sock"
# cbw-tap holds QEMU's image locks on the image; qemu-nbd serves the same
# bytes with locking off (a benchmark only: both never write at once).
qemu-nbd -k "$work/qemu.sock" -x disk --shared=8 --persistent --cache=writeback --aio=threads \
  --image-opts "driver=raw,file.driver=file,file.filename=$img,file.locking=off" &
pids+=($!)
wait_sock "$work/qemu.sock"
uri_tap="nbd+unix:///disk?socket=$work/cbw.sock"
uri_qemu="nbd+unix:///disk?socket=$work/qemu.sock"

if section throughput; then
printf '\n== NBD throughput: qemu-img bench -c %s -d 16, best of %s (MiB/s)\n' "$COUNT" "$RUNS"
printf '%-14s %10s %10s %7s\n' test cbw-tap qemu-nbd ratio
for s in 64K 4K; do
  for mode in read write; do
    w=""; [ "$mode" = write ] && w="-w"
    a=$(bench "$uri_tap" "$s" "$w"); b=$(bench "$uri_qemu" "$s" "$w")
    printf '%-14s %10.0f %10.0f %7.2f\n' "$mode $s" "$a" "$b" "$(awk -v a="$a" -v b="$b" 'BEGIN { print a / b }')"
  done
done
fi

# ------------------------------------------------------------------- latency
# Writes WRITES x 4 KiB at random offsets through one qemu-io and prints
# the per-request latencies in microseconds (from qemu-io's ops/sec).
latencies() { # uri seed [count]
  python3 - "$1" "$2" "${3:-$WRITES}" "$(numfmt --from=iec "$SIZE")" <<'PY'
import os, random, re, subprocess, sys
uri, seed, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
r = random.Random(seed)
cmds = []
for _ in range(n):
    cmds += ["-c", "write -P 0x%02x %d 4096" % (r.randrange(1, 256), r.randrange(size // 4096) * 4096)]
out = subprocess.run(["qemu-io", "-t", os.environ.get("LAT_CACHE", "writeback"), "-f", "raw", uri] + cmds, capture_output=True, text=True, check=True).stdout
ops = [float(m) for m in re.findall(r"and ([0-9.]+) ops/sec", out)]
assert len(ops) == n, (len(ops), out[-500:])
for o in ops:
    print("%.1f" % (1e6 / o))
PY
}
pct() { sort -n | awk -v p="$1" '{ a[NR] = $1 } END { i = int(NR * p / 100 + 0.999999); if (i < 1) i = 1; print a[i] }'; }

# The timed writes go in rounds of $CHUNK (one qemu-io each): during a
# backup a round counts only if the backup was still running when it
# ended, so no write timed after the backup is mixed in (a fast backup of
# a small image ends before $WRITES writes are done; then fewer count —
# the line says how many). Idle writes go in the same rounds.
rounds() { # uri seed out [pid]: up to $WRITES writes, while pid lives
  local i=0 n=0
  : > "$3"
  while [ "$n" -lt "$WRITES" ]; do
    latencies "$1" $(( $2 * 1000 + i )) "$CHUNK" > "$3.round"
    i=$(( i + 1 ))
    if [ -n "${4:-}" ] && ! kill -0 "$4" 2>/dev/null; then break; fi
    cat "$3.round" >> "$3"
    n=$(( n + CHUNK ))
  done
  rm -f "$3.round"
}

# during a backup; $1: prefix for the consumer side (e.g. "nice -n 10")
during() { # nice-prefix seed out [backup flags]
  $1 "$bin/cbw-tap" backup --control "$work/cbw.sock.ctl" --json ${4:-} 2>"$work/backup.json" \
    | $1 "$bin/vma-encode" - 2>/dev/null > /dev/null &
  local bk=$!
  sleep 0.05
  rounds "$uri_tap" "$2" "$3" "$bk"
  local running=yes
  kill -0 $bk 2>/dev/null || running=no
  wait $bk
  python3 - "$work/backup.json" "$running" "$(wc -l < "$3")" <<'PY'
import json, sys
line = [l for l in open(sys.argv[1]) if l.startswith("{")][-1]
s = json.loads(line)["stats"]
print("   backup: %d clusters, %d by copy-before-write, %d guest writes delayed (mean %.3f ms, longest %.3f ms), %.2f s; %s timed writes while it ran%s"
      % (s["clusters_emitted"], s["cbw_clusters"], s["guest_writes_delayed"],
         s["total_delay_seconds"] * 1000 / max(1, s["guest_writes_delayed"]),
         s["longest_delay_seconds"] * 1000, s["elapsed_seconds"], sys.argv[3],
         "" if sys.argv[2] == "no" else " (stopped at WRITES, backup still running)"))
PY
}

# Each scenario is measured right after its own idle baseline (same
# offsets pattern, different seed), so load from elsewhere on the machine
# affects both alike.
if section latency; then
printf '\n== guest write latency, %s x 4 KiB random writes (microseconds; x = during / idle)\n' "$WRITES"
printf '%-38s %8s %8s %8s %8s %7s %7s\n' "" "idle p50" "p99" "bk p50" "p99" "p50 x" "p99 x"
scenario() { # label nice-prefix seed [backup flags]
  # Warm the image again: the kernel may have dropped some of its pages
  # since (proactive reclaim such as DAMON takes cold ones), and a
  # copy-before-write that reads from the disk instead of the page cache
  # measures the disk, not the backup.
  cat "$img" > /dev/null
  rounds "$uri_tap" "$3" "$work/lat-idle.txt"
  local stats; stats=$(during "$2" $(( $3 + 1 )) "$work/lat-backup.txt" "${4:-}")
  local a50 a99 b50 b99
  if [ ! -s "$work/lat-backup.txt" ]; then
    printf '%-38s no round of %s writes ended while the backup ran (larger SIZE?)\n' "$1" "$CHUNK"
    echo "$stats"; return
  fi
  a50=$(pct 50 < "$work/lat-idle.txt"); a99=$(pct 99 < "$work/lat-idle.txt")
  b50=$(pct 50 < "$work/lat-backup.txt"); b99=$(pct 99 < "$work/lat-backup.txt")
  printf '%-38s %8s %8s %8s %8s %7.2f %7.2f\n' "$1" "$a50" "$a99" "$b50" "$b99" \
    "$(awk -v a="$b50" -v b="$a50" 'BEGIN { print a / b }')" "$(awk -v a="$b99" -v b="$a99" 'BEGIN { print a / b }')"
  echo "$stats"
}
scenario "backup at full speed" "" 10
# The backup's own work on one CPU (the last), the guest on the others.
cpu=$(( $(nproc) - 1 ))
scenario "full speed, --cpus $cpu" "taskset -c $cpu" 50 "--cpus $cpu"
scenario "backup, consumer SCHED_IDLE" "chrt --idle 0" 40
scenario "backup, consumer at nice 10" "nice -n 10" 20
scenario "backup, nice 10, --bwlimit $BWLIMIT" "nice -n 10" 30 "--bwlimit $BWLIMIT"
fi

# --------------------------------------------------------------- live backup
now() { date +%s.%N; }
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
serve_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; } # user + system clock ticks
# One round of one build on one image: its own serve (the image locks
# allow one at a time), t(encode) and t(live) appended to $work/t-enc.TAG
# and $work/t-live.TAG, peak RSS of the last round in $work/rss-*.TAG.
live_round() { # bindir tag image
  local b=$1 tag=$2 limg=$3 spid t0 t1 t2
  rm -f "$work/live.sock" "$work/live.sock.ctl"
  "$b/cbw-tap" serve --socket "$work/live.sock" drive-scsi0="$limg" 2>"$work/live-serve.log" &
  spid=$!
  pids+=($spid)
  wait_sock "$work/live.sock.ctl"
  t0=$(now)
  /usr/bin/time -o "$work/rss-enc.$tag" -f '%M %U %S' "$b/vma-encode" drive-scsi0="$limg" 2>>"$work/live-encode.log" | cat > /dev/null
  t1=$(now)
  c0=$(serve_ticks "$spid")
  /usr/bin/time -o "$work/rss-bk.$tag" -f '%M %U %S' "$b/cbw-tap" backup --control "$work/live.sock.ctl" 2>"$work/live-backup.log" \
    | /usr/bin/time -o "$work/rss-encs.$tag" -f '%M %U %S' "$b/vma-encode" - 2>>"$work/live-encode.log" | cat > /dev/null
  t2=$(now)
  c1=$(serve_ticks "$spid")
  awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }' >> "$work/t-enc.$tag"
  awk -v a="$t1" -v b="$t2" 'BEGIN { print b - a }' >> "$work/t-live.$tag"
  # CPU seconds (user + system): vma-encode IMG; serve + client + vma-encode -
  awk '{ print $2 + $3 }' "$work/rss-enc.$tag" >> "$work/c-enc.$tag"
  cat "$work/rss-bk.$tag" "$work/rss-encs.$tag" | awk -v s="$(( c1 - c0 ))" -v hz="$(getconf CLK_TCK)" \
    '{ c += $2 + $3 } END { print c + s / hz }' >> "$work/c-live.$tag"
  awk '/^VmHWM/ { print $2 }' "/proc/$spid/status" > "$work/rss-serve.$tag"
  kill "$spid"; wait "$spid" 2>/dev/null || true
}
if section live; then
  # BASE_BIN=DIR: also measure the build in DIR, its rounds interleaved
  # with this one's (same machine state), as line "KIND (base)".
  tags="new"; [ -n "${BASE_BIN:-}" ] && tags="new base"
  printf '\n== live backup, %s image, page cache warm, median of %s (seconds; ratio = encode / live)\n' "$LIVE_SIZE" "$LIVE_RUNS"
  [ -n "${BASE_BIN:-}" ] && echo "   (base) = $BASE_BIN, rounds interleaved with $bin"
  echo "   cpu: CPU seconds (user + system) of vma-encode IMG, and of serve + backup client + vma-encode -"
  printf '%-17s %9s %9s %7s %8s %8s %10s %10s %10s %10s\n' image encode live ratio "cpu enc" "cpu live" "serve KiB" "backup KiB" "enc-s KiB" "enc KiB"
  for kind in random half-zero; do
    limg="$work/live-$kind.raw"
    if [ "$(stat -c %s "$limg" 2>/dev/null)" != "$(numfmt --from=iec "$LIVE_SIZE")" ]; then
      python3 - "$limg" "$(numfmt --from=iec "$LIVE_SIZE")" "$kind" <<'PY'
import os, sys
path, size, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
mib = 1 << 20
with open(path, "wb") as f:
    for i in range(size // mib):
        f.write(os.urandom(mib) if kind == "random" or i % 2 == 0 else bytes(mib))
PY
    fi
    cat "$limg" > /dev/null
    for tag in $tags; do : > "$work/t-enc.$tag"; : > "$work/t-live.$tag"; : > "$work/c-enc.$tag"; : > "$work/c-live.$tag"; done
    for _ in $(seq "$LIVE_RUNS"); do
      for tag in $tags; do
        b=$bin; [ "$tag" = base ] && b=$BASE_BIN
        live_round "$b" "$tag" "$limg"
      done
    done
    for tag in $tags; do
      te=$(median < "$work/t-enc.$tag"); tl=$(median < "$work/t-live.$tag")
      ce=$(median < "$work/c-enc.$tag"); cl=$(median < "$work/c-live.$tag")
      label=$kind; [ "$tag" = base ] && label="$kind (base)"
      printf '%-17s %9.2f %9.2f %7.2f %8.2f %8.2f %10s %10s %10s %10s\n' "$label" "$te" "$tl" \
        "$(awk -v a="$te" -v b="$tl" 'BEGIN { print a / b }')" "$ce" "$cl" "$(cat "$work/rss-serve.$tag")" \
        "$(awk '{ print $1 }' "$work/rss-bk.$tag")" "$(awk '{ print $1 }' "$work/rss-encs.$tag")" "$(awk '{ print $1 }' "$work/rss-enc.$tag")"
    done
  done
  echo "   load: $(uptime | sed 's/.*load average/load average/')"
fi
