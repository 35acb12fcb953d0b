#!/usr/bin/env bash
# check.sh: check vma-tools archives against Proxmox's own `vma` tool
# (built from QEMU + pve-qemu's vma patch by scripts/pve-vma/build.sh).
#
# 1. Proxmox's vma on the reference fixtures (shared/fixtures/pve): the
#    outputs of EXPECTED.txt (proves the binary is the real thing).
# 2. Archives written by OUR vma-encode (images, odd sizes, several
#    devices, configs, --uuid/--uuid-from/--ctime, --no-data-checksums,
#    cluster streams from cbw-tap: live order, --sorted, merges with
#    --base, --sorted --base, a chain of merges), each read by Proxmox's
#    vma: `verify` (silent, exit 0), `verify -v` (exit 0), `list`,
#    `config -c`, `extract` (from the file and from a pipe `-`): sha256
#    of every extracted file equal to the source (padded to 512) and to
#    OUR `vma-decode extract`. Our `vma-decode` called as `vma` must print
#    exactly what Proxmox's does for list / verify -v / extract.
#    Also: streams made by gen_stream.py (clusters shuffled across devices,
#    --sorted --uuid-from spilled; a vmstate device), a sparse device past
#    4 GiB, restore maps `vma extract -v -r MAP - DIR` (as qmrestore) onto
#    targets full of 0xff, and a self-test (damaged archives must FAIL).
# 3. Archives written by Proxmox's `vma create` from the same images, read
#    by OUR vma-verify (exit 0) and vma-decode extract: byte-exact to
#    Proxmox's extract and to the sources; the same for the fixtures.
#
# Usage: scripts/pve-vma/check.sh
# Env:   VMA       Proxmox's vma (default: the one build.sh leaves in
#                  ${PVE_VMA_DIR:-/var/tmp/pve-vma}/bin/vma)
#        VMA_BIN   our binaries (default: built, see scripts/vma-bin.sh)
#        W         work dir (default: a temporary one, removed unless KEEP=1)
#        FIX       the fixtures (default: ../shared/fixtures beside the checkout)
# Exit: 0 when every check passed, 1 otherwise (FAIL lines say which), 2
#       when a tool is missing.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$HERE/../.." && pwd)
VMA=${VMA:-${PVE_VMA_DIR:-/var/tmp/pve-vma}/bin/vma}
. "$root/scripts/vma-bin.sh"
BIN=$(cd "$VMA_BIN" && pwd)
[ -n "${W:-}" ] || W=$(mktemp -d /var/tmp/pve-vma-check.XXXXXX)
FIX=${FIX:-$root/../shared/fixtures}
export TZ=UTC
for t in "$VMA" "$BIN/vma-encode" "$BIN/vma-decode" "$BIN/vma-verify" "$BIN/cbw-tap"; do
  [ -x "$t" ] || { echo "check.sh: $t missing" >&2; exit 2; }
done
command -v qemu-io >/dev/null || { echo "check.sh: qemu-io (qemu-utils) needed" >&2; exit 2; }
rm -rf "$W"; mkdir -p "$W"; cd "$W" || exit 2
mkdir ourvma && ln -s "$BIN/vma-decode" ourvma/vma
OURVMA=$W/ourvma/vma
serve_pid=
cleanup() {
  if [ -n "$serve_pid" ]; then kill "$serve_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null; fi
  [ -n "${KEEP:-}" ] || rm -rf "$W"
}
trap cleanup EXIT

npass=0 nfail=0
pass() { echo "PASS $*"; npass=$((npass + 1)); }
fail() { echo "FAIL $*"; nfail=$((nfail + 1)); }
# expect RC LABEL CMD...: run CMD (stdout > $W/out, stderr > $W/err), check its exit code
expect() {
  local want=$1 label=$2; shift 2
  "$@" >"$W/out" 2>"$W/err"; local rc=$?
  if [ "$rc" = "$want" ]; then pass "$label (exit $rc)"; else
    fail "$label: exit $rc, wanted $want"; sed 's/^/    stderr: /' "$W/err" | head -20; return 1; fi
}
sha() { sha256sum "$1" | cut -c1-64; }
# same_out A B: the two outputs are identical but for the seconds in
# 'duration N sec' of progress lines (timing, not format)
same_out() { cmp -s <(sed -E 's/duration [0-9]+ sec/duration N sec/' "$1") <(sed -E 's/duration [0-9]+ sec/duration N sec/' "$2"); }
# padsha FILE: sha256 of FILE zero-padded to a multiple of 512 bytes (what vma extract writes)
padsha() {
  local s; s=$(stat -c %s "$1")
  { cat "$1"; head -c $(( (512 - s % 512) % 512 )) /dev/zero; } | sha256sum | cut -c1-64
}

# ---------------------------------------------------------------- sources
mkdir src
python3 "$FIX/make_images.py" src --seed 3 \
  --image rand.raw:3M:random --image mixed.raw:1M+12345:mixed \
  --image sparse.raw:16M:sparse --image zeros.raw:512K:zero \
  --image odd.raw:65536*7+1:mixed --image tiny.raw:4097:random \
  --image nearzero.raw:1M:nearzero --image pattern.raw:2M+512:pattern \
  --image sector.raw:65536*3+512:random >/dev/null || exit 2
python3 - src <<'PY'
import os, random, sys
d = sys.argv[1]
r = random.Random(42)
# half-zero: 2 MiB data then 2 MiB of written (not sparse) zeros
with open(os.path.join(d, "halfzero.raw"), "wb") as f:
    f.write(r.randbytes(2 << 20)); f.write(bytes(2 << 20))
# half-hole: 1 MiB + 5000 bytes data, then a hole to 3 MiB
with open(os.path.join(d, "halfhole.raw"), "wb") as f:
    f.write(r.randbytes((1 << 20) + 5000)); f.truncate(3 << 20)
# an image whose size is < 1 cluster and not a multiple of 512
with open(os.path.join(d, "small.raw"), "wb") as f:
    f.write(r.randbytes(777))
PY
S=$W/src

# ------------------------------------------------- 1. the reference fixtures
echo "== 1. Proxmox vma on shared/fixtures/pve (EXPECTED.txt)"
# name: expected sha256 of each extracted file (from EXPECTED.txt)
declare -A FX=(
  [one-disk]="disk-drive-scsi0.raw=d67e78f478af5f3118c457c8ecc0c3f026ca3bfd2ed70bcd68867d42eb64dadd qemu-server.conf=13e8c9b91563e4f0b28eca2c331e83b89964b990bf9c64c37ac08cdbc0216fe6"
  [multi-disk]="disk-drive-ide0.raw=f7ae5cd690328cd8290b37d5028850244265907a2a528df9cb2962c8069fd185 disk-drive-sata2.raw=8a39d2abd3999ab73c34db2476849cddf303ce389b35826850f9a700589b4a90 disk-drive-scsi0.raw=d67e78f478af5f3118c457c8ecc0c3f026ca3bfd2ed70bcd68867d42eb64dadd disk-drive-virtio1.raw=b57fb5c55e3b124fd824004b1abbb884170e71a1cf5b2d372760a5c3238de6f1 pve-firewall.fw=72643af1e3432dbc4ff80a149de1e856202a25aa89a947af4bdf4382ce881ce1 qemu-server.conf=13e8c9b91563e4f0b28eca2c331e83b89964b990bf9c64c37ac08cdbc0216fe6"
  [full]="disk-drive-scsi0.raw=9364b948f3cfc767fbbe72a0ef9a64e69f6ac738fded86b6582c83f739b5fc36 qemu-server.conf=13e8c9b91563e4f0b28eca2c331e83b89964b990bf9c64c37ac08cdbc0216fe6"
  [empty]="qemu-server.conf=13e8c9b91563e4f0b28eca2c331e83b89964b990bf9c64c37ac08cdbc0216fe6"
)
for a in one-disk multi-disk full empty; do
  f=$FIX/pve/$a.vma
  expect 0 "fixture $a: vma list" "$VMA" list "$f"
  if grep -q '^CTIME: Thu Nov 26 10:45:05 2026$' "$W/out"; then pass "fixture $a: CTIME as EXPECTED"; else fail "fixture $a: CTIME"; fi
  expect 0 "fixture $a: vma verify -v" "$VMA" verify -v "$f"
  expect 0 "fixture $a: vma extract" "$VMA" extract "$f" "fx-$a"
  for kv in ${FX[$a]}; do
    n=${kv%%=*} want=${kv#*=}
    got=$(sha "fx-$a/$n" 2>/dev/null)
    if [ "$got" = "$want" ]; then pass "fixture $a: $n sha256 as EXPECTED"; else fail "fixture $a: $n sha256 $got, EXPECTED $want"; fi
  done
  nfiles=$(ls "fx-$a" | wc -l); nwant=$(echo ${FX[$a]} | wc -w)
  [ "$nfiles" = "$nwant" ] && pass "fixture $a: $nfiles files" || fail "fixture $a: $nfiles files, EXPECTED $nwant"
done

# ---------------------------------------------- shared archive check
# check_archive ARCHIVE "DEV=SRC ..." "CFGNAME=SRC ..." [CTIME-LINE]
#   Proxmox vma must read ARCHIVE and give back the sources; our tools
#   must agree with it.
check_archive() {
  local a=$1 devs=$2 cfgs=$3 ctime=${4:-} t; t=$(basename "$a" .vma)
  pushd "$W" >/dev/null || return
  expect 0 "$t: vma verify" "$VMA" verify "$a"
  [ -s "$W/out" ] || [ -s "$W/err" ] && fail "$t: vma verify printed something" || pass "$t: vma verify silent"
  expect 0 "$t: vma verify -v" "$VMA" verify -v "$a"; cp "$W/out" "$t.pve-verify"
  [ -s "$W/err" ] && { fail "$t: vma verify -v stderr:"; sed 's/^/    /' "$W/err"; }
  expect 0 "$t: vma list" "$VMA" list "$a"; cp "$W/out" "$t.pve-list"
  # every device and config listed, in order
  local want_list="" kv n
  for kv in $cfgs; do n=${kv%%=*}; want_list+="CFG: size: $(stat -c %s "${kv#*=}") name: $n"$'\n'; done
  local id=1
  for kv in $devs; do
    n=${kv%%=*}; local s; s=$(stat -c %s "${kv#*=}")
    want_list+="DEV: dev_id=$id size: $(( (s + 511) / 512 * 512 )) devname: $n"$'\n'; id=$((id + 1))
  done
  if [ "$(grep -v '^CTIME' "$t.pve-list")" = "${want_list%$'\n'}" ]; then pass "$t: vma list shows the devices/configs"; else
    fail "$t: vma list:"; sed 's/^/    /' "$t.pve-list"; echo "    wanted:"; printf '%s' "$want_list" | sed 's/^/    /'; fi
  if [ -n "$ctime" ]; then
    grep -qx "CTIME: $ctime" "$t.pve-list" && pass "$t: CTIME $ctime" || fail "$t: CTIME: $(grep CTIME "$t.pve-list")"
  fi
  # our vma-decode, called as vma, prints what Proxmox's prints
  "$OURVMA" list "$a" >"$t.our-list" 2>&1
  cmp -s "$t.pve-list" "$t.our-list" && pass "$t: our 'vma list' output identical" || { fail "$t: our 'vma list' differs:"; diff "$t.pve-list" "$t.our-list" | sed 's/^/    /'; }
  "$OURVMA" verify -v "$a" >"$t.our-verify" 2>&1
  same_out "$t.pve-verify" "$t.our-verify" && pass "$t: our 'vma verify -v' output identical" || { fail "$t: our 'vma verify -v' differs:"; diff "$t.pve-verify" "$t.our-verify" | head -20 | sed 's/^/    /'; }
  # extract with Proxmox's tool, from the file and from a pipe
  expect 0 "$t: vma extract" "$VMA" extract "$a" "$t.pve"; cp "$W/out" "$t.pve-extract"
  expect 0 "$t: cat | vma extract -" sh -c 'cat "$1" | "$2" extract - "$3"' sh "$a" "$VMA" "$t.pipe"
  expect 0 "$t: our vma-decode extract" "$BIN/vma-decode" extract "$a" "$t.ours"
  "$OURVMA" extract "$a" "$t.ourvma" >"$t.ourvma-extract" 2>&1
  sed "s#$t.ourvma/#$t.pve/#" "$t.ourvma-extract" | cmp -s - "$t.pve-extract" && pass "$t: our 'vma extract' output identical" || { fail "$t: our 'vma extract' output differs:"; diff "$t.pve-extract" "$t.ourvma-extract" | sed 's/^/    /'; }
  for kv in $devs; do
    n=${kv%%=*}; local src=${kv#*=} want p o
    want=$(padsha "$src"); p=$(sha "$t.pve/disk-$n.raw" 2>/dev/null); o=$(sha "$t.ours/disk-$n.raw" 2>/dev/null)
    local q; q=$(sha "$t.pipe/disk-$n.raw" 2>/dev/null)
    if [ "$p" = "$want" ] && [ "$q" = "$want" ]; then pass "$t: $n: Proxmox extract sha256 = source ($(basename "$src"), padded) $want"; else
      fail "$t: $n: Proxmox extract sha256 file=$p pipe=$q, source padded $want"; fi
    [ "$o" = "$want" ] && pass "$t: $n: our extract sha256 = Proxmox's" || fail "$t: $n: our extract sha256 $o, Proxmox $p"
  done
  for kv in $cfgs; do
    n=${kv%%=*}; local src=${kv#*=}
    if cmp -s "$t.pve/$n" "$src" && cmp -s "$t.ours/$n" "$src"; then pass "$t: config $n byte-identical (Proxmox and ours)"; else fail "$t: config $n differs"; fi
    "$VMA" config "$a" -c "$n" >"$W/cfg" 2>"$W/err"; local rc=$?
    [ "$rc" = 0 ] && cmp -s "$W/cfg" "$src" && pass "$t: vma config -c $n (exit 0, same bytes)" || fail "$t: vma config -c $n exit $rc"
  done
  # nothing else extracted
  local want_n; want_n=$(( $(echo $devs | wc -w) + $(echo $cfgs | wc -w) ))
  local got_n; got_n=$(ls "$t.pve" | wc -l)
  [ "$got_n" = "$want_n" ] && pass "$t: Proxmox extracted $got_n files" || { fail "$t: Proxmox extracted $got_n files, wanted $want_n:"; ls "$t.pve" | sed 's/^/    /'; }
  rm -rf "$t.pve" "$t.pipe" "$t.ours" "$t.ourvma"
  popd >/dev/null || return
}

# ------------------------------------------------- 2. archives we write
echo "== 2. archives written by vma-encode, read by Proxmox vma"
cd "$S" || exit 2
E=$BIN/vma-encode
CF="qemu-server.conf=$S/qemu-server.conf"
CF2="$CF pve-firewall.fw=$S/pve-firewall.fw"
enc() { local label=$1; shift; expect 0 "encode $label" "$E" "$@"; }

enc one-random -c qemu-server.conf -o "$W/one-random.vma" drive-scsi0=rand.raw &&
  check_archive "$W/one-random.vma" "drive-scsi0=$S/rand.raw" "$CF"
enc sparse -c qemu-server.conf -o "$W/sparse.vma" drive-virtio0=sparse.raw &&
  check_archive "$W/sparse.vma" "drive-virtio0=$S/sparse.raw" "$CF"
enc halfzero -o "$W/halfzero.vma" -c qemu-server.conf drive-scsi0=halfzero.raw drive-scsi1=halfhole.raw &&
  check_archive "$W/halfzero.vma" "drive-scsi0=$S/halfzero.raw drive-scsi1=$S/halfhole.raw" "$CF"
enc odd -o "$W/odd.vma" -c qemu-server.conf drive-scsi0=odd.raw drive-scsi1=tiny.raw drive-scsi2=small.raw drive-scsi3=sector.raw &&
  check_archive "$W/odd.vma" "drive-scsi0=$S/odd.raw drive-scsi1=$S/tiny.raw drive-scsi2=$S/small.raw drive-scsi3=$S/sector.raw" "$CF"
ALL="drive-scsi0=mixed.raw drive-virtio1=sparse.raw drive-sata2=zeros.raw drive-ide0=tiny.raw drive-scsi1=nearzero.raw drive-scsi2=pattern.raw drive-scsi3=odd.raw drive-efidisk0=small.raw"
ALLS=$(for kv in $ALL; do printf '%s=%s/%s ' "${kv%%=*}" "$S" "${kv#*=}"; done)
# shellcheck disable=SC2086
enc multi -c qemu-server.conf -c pve-firewall.fw --uuid-from vm-100 --ctime 1795689905 -o "$W/multi.vma" $ALL &&
  check_archive "$W/multi.vma" "$ALLS" "$CF2" "Thu Nov 26 10:45:05 2026"
# shellcheck disable=SC2086
enc multi-nocrc --no-data-checksums --uuid 0f8a6c34-9129-4fb6-944f-7852fc68351a -c qemu-server.conf -c pve-firewall.fw -o "$W/multi-nocrc.vma" $ALL &&
  check_archive "$W/multi-nocrc.vma" "$ALLS" "$CF2"
enc bare-names -c qemu-server.conf -o "$W/bare-names.vma" rand.raw odd.raw &&
  check_archive "$W/bare-names.vma" "disk0=$S/rand.raw disk1=$S/odd.raw" "$CF"
enc configs-only -c qemu-server.conf -c pve-firewall.fw -o "$W/configs-only.vma" &&
  check_archive "$W/configs-only.vma" "" "$CF2"
# written to a pipe (standard output), read by Proxmox from its standard input
expect 0 "stdout: vma-encode | vma extract -" sh -c '"$1" -c qemu-server.conf drive-scsi0=mixed.raw drive-scsi1=odd.raw | "$2" extract - "$3"' sh "$E" "$VMA" "$W/stdout.pve"
[ "$(sha "$W/stdout.pve/disk-drive-scsi0.raw")" = "$(padsha mixed.raw)" ] && [ "$(sha "$W/stdout.pve/disk-drive-scsi1.raw")" = "$(padsha odd.raw)" ] &&
  pass "stdout: both devices sha256 = sources" || fail "stdout: extracted images differ"

# cluster streams from cbw-tap (live order; --sorted; merges)
echo "== 2b. cluster streams (cbw-tap) and merges, read by Proxmox vma"
mkdir -p "$W/live" "$W/state"
cp mixed.raw "$W/live/d0.raw"; cp odd.raw "$W/live/d1.raw"; cp sparse.raw "$W/live/d2.raw"
"$BIN/cbw-tap" serve --socket "$W/s" --state-dir "$W/state" drive-scsi0="$W/live/d0.raw" drive-scsi1="$W/live/d1.raw" drive-virtio2="$W/live/d2.raw" 2>"$W/serve.log" &
serve_pid=$!
for _ in $(seq 200); do [ -S "$W/s.ctl" ] && break; sleep 0.05; done
LIVE="drive-scsi0=$W/live/d0.raw drive-scsi1=$W/live/d1.raw drive-virtio2=$W/live/d2.raw"
backup() { "$BIN/cbw-tap" backup --control "$W/s.ctl" "$@"; }
qio() { qemu-io -f raw "nbd+unix:///$1?socket=$W/s" "${@:2}" >/dev/null; }
snap() { mkdir -p "$W/snap$1"; cp "$W/live/d0.raw" "$W/live/d1.raw" "$W/live/d2.raw" "$W/snap$1/"; }
SN() { echo "drive-scsi0=$W/snap$1/d0.raw drive-scsi1=$W/snap$1/d1.raw drive-virtio2=$W/snap$1/d2.raw"; }
expect 0 "stream: cbw-tap backup > s-live.stream" sh -c '"$1" backup --control "$2" --uuid-from vm-200 > "$3"' sh "$BIN/cbw-tap" "$W/s.ctl" "$W/s-live.stream"
snap 0
expect 0 "encode stream-live (stream order)" "$E" -c qemu-server.conf -o "$W/stream-live.vma" - <"$W/s-live.stream" &&
  check_archive "$W/stream-live.vma" "$(SN 0)" "$CF"
expect 0 "encode stream-sorted (--sorted)" "$E" --sorted -c qemu-server.conf -o "$W/stream-sorted.vma" - <"$W/s-live.stream" &&
  check_archive "$W/stream-sorted.vma" "$(SN 0)" "$CF"
# the base of the merges: the last completed backup (a full one, --sorted)
sleep 1
expect 0 "stream: full backup | vma-encode --sorted full.vma" sh -c '"$1" backup --control "$2" --uuid-from vm-200 | "$3" --sorted -c qemu-server.conf -o "$4" -' sh "$BIN/cbw-tap" "$W/s.ctl" "$E" "$W/full.vma"
check_archive "$W/full.vma" "$(SN 0)" "$CF"
# changes: data into a cluster, a cluster zeroed, the last (partial) cluster, a hole filled
qio drive-scsi0 -c "write -P 0x5a 4096 4096" -c "write -z 131072 65536" -c "write -P 0x11 1060864 57"
qio drive-scsi1 -c "write -P 0x22 458752 1"
qio drive-virtio2 -c "write -P 0x33 5242880 12288"
snap 1
sleep 1
expect 0 "stream: cbw-tap backup --incremental > s-inc.stream" sh -c '"$1" backup --control "$2" --incremental --uuid-from vm-200 > "$3"' sh "$BIN/cbw-tap" "$W/s.ctl" "$W/s-inc.stream"
expect 0 "encode merged (--base full.vma)" "$E" -v --base "$W/full.vma" -c qemu-server.conf -o "$W/merged.vma" - <"$W/s-inc.stream" &&
  { grep -h 'merged' "$W/err" | sed 's/^/    /'; check_archive "$W/merged.vma" "$(SN 1)" "$CF"; }
expect 0 "encode merged-sorted (--sorted --base full.vma)" "$E" --sorted --base "$W/full.vma" -c qemu-server.conf -o "$W/merged-sorted.vma" - <"$W/s-inc.stream" &&
  check_archive "$W/merged-sorted.vma" "$(SN 1)" "$CF"
# a chain: the next incremental onto the merged archive
qio drive-scsi0 -c "write -P 0x77 0 65536"
qio drive-virtio2 -c "write -z 5242880 4096"
snap 2
sleep 1
expect 0 "stream: incremental 2 | vma-encode --base merged.vma" sh -c '"$1" backup --control "$2" --incremental --uuid-from vm-200 | "$3" --base "$4" -c qemu-server.conf -o "$5" -' sh "$BIN/cbw-tap" "$W/s.ctl" "$E" "$W/merged.vma" "$W/merged2.vma"
check_archive "$W/merged2.vma" "$(SN 2)" "$CF"
kill "$serve_pid"; wait "$serve_pid" 2>/dev/null; serve_pid=

# ------------------- 2b'. hand-made streams: shuffled devices, vmstate
echo "== 2b'. streams from gen_stream.py (shuffled across devices; vmstate), read by Proxmox vma"
G=$HERE/gen_stream.py
SH="drive-scsi0=$S/mixed.raw drive-scsi1=$S/odd.raw drive-virtio2=$S/sparse.raw drive-ide0=$S/tiny.raw drive-scsi3=$S/halfzero.raw"
# shellcheck disable=SC2086
python3 "$G" "$W/s-shuf.stream" --time 1795689905 --seed 7 $SH || fail "gen_stream shuffled"
expect 0 "encode shuffled (stream order)" "$E" -c qemu-server.conf -o "$W/shuffled.vma" - <"$W/s-shuf.stream" &&
  check_archive "$W/shuffled.vma" "$SH" "$CF" "Thu Nov 26 10:45:05 2026"
expect 0 "encode shuffled-sorted (--sorted --uuid-from, spilled)" "$E" --sorted --uuid-from vm-300 --spool-memory 100000 -c qemu-server.conf -o "$W/shuffled-sorted.vma" - <"$W/s-shuf.stream" &&
  check_archive "$W/shuffled-sorted.vma" "$SH" "$CF" "Thu Nov 26 10:45:05 2026"
# vmstate: Proxmox lists it as VMSTATE and extracts it to vmstate.bin
# check_vmstate NAME VMSTATE-FILE PROXMOX-EXPECTED-SHA
check_vmstate() {
  local t=$1 vs=$2 pwant=$3
  python3 "$G" "$W/s-$t.stream" --time 1795689905 --seed 3 "drive-scsi0=$S/mixed.raw" "drive-scsi1=$S/tiny.raw" --vmstate "$vs" || fail "gen_stream $t"
  expect 0 "encode $t" "$E" -c qemu-server.conf -o "$W/$t.vma" - <"$W/s-$t.stream" || return
  expect 0 "$t: vma verify -v" "$VMA" verify -v "$W/$t.vma"
  expect 0 "$t: vma list" "$VMA" list "$W/$t.vma"
  grep -qx "VMSTATE: dev_id=3 memory: $(stat -c %s "$vs")" "$W/out" && pass "$t: vma list: VMSTATE: dev_id=3 memory: $(stat -c %s "$vs")" || { fail "$t: vma list:"; sed 's/^/    /' "$W/out"; }
  "$OURVMA" list "$W/$t.vma" | cmp -s - "$W/out" && pass "$t: our 'vma list' output identical" || fail "$t: our 'vma list' differs"
  rm -rf "$W/$t.pve" "$W/$t.ours"
  expect 0 "$t: vma extract" "$VMA" extract "$W/$t.vma" "$W/$t.pve"
  expect 0 "$t: our vma-decode extract" "$BIN/vma-decode" extract "$W/$t.vma" "$W/$t.ours"
  for n in drive-scsi0=mixed.raw drive-scsi1=tiny.raw; do
    [ "$(sha "$W/$t.pve/disk-${n%%=*}.raw")" = "$(padsha "$S/${n#*=}")" ] && cmp -s "$W/$t.pve/disk-${n%%=*}.raw" "$W/$t.ours/disk-${n%%=*}.raw" &&
      pass "$t: ${n%%=*}: Proxmox and our extract = source" || fail "$t: ${n%%=*} differs"
  done
  local p o; p=$(sha "$W/$t.pve/vmstate.bin"); o=$(sha "$W/$t.ours/vmstate.bin")
  [ "$o" = "$(sha "$vs")" ] && pass "$t: our vmstate.bin = source ($(stat -c %s "$W/$t.ours/vmstate.bin") bytes)" || fail "$t: our vmstate.bin $o, source $(sha "$vs")"
  [ "$p" = "$pwant" ] && pass "$t: Proxmox vmstate.bin sha256 as expected ($(stat -c %s "$W/$t.pve/vmstate.bin") bytes)" || fail "$t: Proxmox vmstate.bin $p ($(stat -c %s "$W/$t.pve/vmstate.bin") bytes), expected $pwant"
  rm -rf "$W/$t.pve" "$W/$t.ours"
}
python3 - "$W" <<'PY2'
import random, sys
r = random.Random(9)
open(sys.argv[1] + "/vmstate-full.bin", "wb").write(r.randbytes(1 << 20))
d = bytearray(r.randbytes(200000)); d[8192:12288] = bytes(4096)
open(sys.argv[1] + "/vmstate-zero.bin", "wb").write(d)
# what Proxmox's extract writes for it: every stored 4 KiB block in full,
# zero blocks left out (its restore writes no zeros into vmstate.bin)
out = b"".join(d[i:i + 4096] + bytes(4096 - len(d[i:i + 4096])) for i in range(0, len(d), 4096) if d[i:i + 4096].count(0) != len(d[i:i + 4096]))
open(sys.argv[1] + "/vmstate-zero.pve-expected", "wb").write(out)
PY2
# vmstate of whole 64 KiB clusters, no zero block: Proxmox gives it back exactly
check_vmstate vmstate-full "$W/vmstate-full.bin" "$(sha "$W/vmstate-full.bin")"
# vmstate of 200000 bytes with one zero 4 KiB block: Proxmox's reader
# drops the zero block and pads the last block (a Proxmox reader quirk,
# its own writer elides zero blocks the same way); ours gives the source
check_vmstate vmstate-zero "$W/vmstate-zero.bin" "$(sha "$W/vmstate-zero.pve-expected")"

# --------------------------- 2b''. a sparse device past 4 GiB
echo "== 2b''. a sparse 4 GiB + 1 MiB + 512 device with data past 4 GiB"
truncate -s $(( (4 << 30) + (1 << 20) + 512 )) "$W/big.raw"
head -c 70000 /dev/urandom | dd of="$W/big.raw" bs=1 seek=$(( (4 << 30) + 12345 )) conv=notrunc status=none
head -c 512 /dev/urandom | dd of="$W/big.raw" bs=512 seek=$(( ((4 << 30) + (1 << 20)) / 512 )) conv=notrunc status=none
head -c 4096 /dev/urandom | dd of="$W/big.raw" bs=4096 seek=1000 conv=notrunc status=none
expect 0 "encode big" "$E" -c qemu-server.conf -o "$W/big.vma" drive-scsi0="$W/big.raw" &&
  check_archive "$W/big.vma" "drive-scsi0=$W/big.raw" "$CF"
rm -f "$W/big.raw" "$W/big.vma"

# ------------------------- 2c. restore maps (qmrestore's path) onto garbage
echo "== 2c. vma extract -v -r MAP - DIR (as qmrestore) onto targets full of 0xff"
# check_map ARCHIVE "DEV=SRC ...": every target pre-filled with 0xff, map
# lines 'format=raw:1:DEV=PATH' (1: zeros must be written); Proxmox's and
# our restore must both leave exactly the source (padded) in each target.
check_map() {
  local a=$1 devs=$2 t kv n; t=$(basename "$a" .vma)
  for who in pve ours; do
    rm -rf "$W/map-$t-$who"; mkdir -p "$W/map-$t-$who"; : >"$W/map-$t-$who.map"
    for kv in $devs; do
      n=${kv%%=*}; local s; s=$(stat -c %s "${kv#*=}"); s=$(( (s + 511) / 512 * 512 ))
      head -c "$s" /dev/zero | tr '\0' '\377' >"$W/map-$t-$who/$n.img"
      echo "format=raw:1:$n=$W/map-$t-$who/$n.img" >>"$W/map-$t-$who.map"
    done
    echo done >>"$W/map-$t-$who.map"
  done
  expect 0 "map $t: cat | vma extract -v -r MAP - DIR" sh -c 'cat "$1" | "$2" extract -v -r "$3" - "$4"' sh "$a" "$VMA" "$W/map-$t-pve.map" "$W/map-$t-pve/dir"
  expect 0 "map $t: cat | our vma-decode extract -r MAP - DIR" sh -c 'cat "$1" | "$2" extract -r "$3" - "$4"' sh "$a" "$BIN/vma-decode" "$W/map-$t-ours.map" "$W/map-$t-ours/dir"
  for kv in $devs; do
    n=${kv%%=*}; local want p o; want=$(padsha "${kv#*=}")
    p=$(sha "$W/map-$t-pve/$n.img"); o=$(sha "$W/map-$t-ours/$n.img")
    [ "$p" = "$want" ] && pass "map $t: $n: Proxmox restore = source" || fail "map $t: $n: Proxmox restore sha256 $p, source padded $want"
    [ "$o" = "$want" ] && pass "map $t: $n: our restore = source" || fail "map $t: $n: our restore sha256 $o, source padded $want"
  done
  rm -rf "$W/map-$t-pve" "$W/map-$t-ours"
}
check_map "$W/multi.vma" "$ALLS"
check_map "$W/odd.vma" "drive-scsi0=$S/odd.raw drive-scsi1=$S/tiny.raw drive-scsi2=$S/small.raw drive-scsi3=$S/sector.raw"
check_map "$W/halfzero.vma" "drive-scsi0=$S/halfzero.raw drive-scsi1=$S/halfhole.raw"
check_map "$W/stream-live.vma" "$(SN 0)"
check_map "$W/merged.vma" "$(SN 1)"

# ------------------------------------------- 2d. the checks can fail
echo "== 2d. self-test: damaged copies of one-random.vma must make the checks fail"
# must_fail LABEL CMD...: the checks in CMD must report at least one FAIL
must_fail() {
  local label=$1; shift
  local before=$nfail p0=$npass
  "$@" >"$W/selftest.log" 2>&1
  local got=$((nfail - before)); nfail=$before; npass=$p0
  if [ "$got" -gt 0 ]; then pass "self-test $label: $got check(s) failed as they must: $(grep -m1 '^FAIL' "$W/selftest.log" | cut -c1-160)"; else
    fail "self-test $label: no check failed"; fi
}
hs=$(python3 -c 'import struct,sys; print(struct.unpack(">I", open(sys.argv[1],"rb").read()[56:60])[0])' "$W/one-random.vma")
# a data byte (first cluster, past the 512-byte extent header)
cp "$W/one-random.vma" "$W/dmg-data.vma"
printf '\x00' | dd of="$W/dmg-data.vma" bs=1 seek=$((hs + 512 + 70000)) conv=notrunc status=none
must_fail "data byte" check_archive "$W/dmg-data.vma" "drive-scsi0=$S/rand.raw" "$CF"
# a byte of the first extent header's MD5
cp "$W/one-random.vma" "$W/dmg-ext.vma"
printf '\x00' | dd of="$W/dmg-ext.vma" bs=1 seek=$((hs + 32)) conv=notrunc status=none
must_fail "extent header" check_archive "$W/dmg-ext.vma" "drive-scsi0=$S/rand.raw" "$CF"
# the archive truncated by one extent's worth
cp "$W/one-random.vma" "$W/dmg-trunc.vma"; truncate -s -100000 "$W/dmg-trunc.vma"
must_fail "truncated" check_archive "$W/dmg-trunc.vma" "drive-scsi0=$S/rand.raw" "$CF"
# the wrong source
must_fail "wrong source" check_archive "$W/one-random.vma" "drive-scsi0=$S/pattern.raw" "$CF"
rm -f "$W"/dmg-*.vma

# ------------------------------------- 3. archives Proxmox writes, read by us
echo "== 3. archives written by Proxmox vma create, read by vma-verify / vma-decode"
# check_pve NAME "DEV=SRC ..." "CFG ..."
check_pve() {
  local t=$1 devs=$2 cfgs=$3 args=() kv n
  for kv in $cfgs; do args+=(-c "$kv"); done
  for kv in $devs; do args+=(-d "format=raw:$kv"); done
  expect 0 "pve-$t: vma create" "$VMA" create "$W/pve-$t.vma" "${args[@]}" || return
  local a=$W/pve-$t.vma
  expect 0 "pve-$t: our vma-verify" "$BIN/vma-verify" "$a"
  expect 0 "pve-$t: vma extract" "$VMA" extract "$a" "$W/pve-$t.pve"
  expect 0 "pve-$t: our vma-decode extract" "$BIN/vma-decode" extract "$a" "$W/pve-$t.ours"
  if diff -r "$W/pve-$t.pve" "$W/pve-$t.ours" >/dev/null; then pass "pve-$t: our extract byte-exact to Proxmox's ($(ls "$W/pve-$t.pve" | wc -l) files)"; else
    fail "pve-$t: extracts differ:"; diff -r "$W/pve-$t.pve" "$W/pve-$t.ours" | head | sed 's/^/    /'; fi
  for kv in $devs; do
    n=${kv%%=*}
    [ "$(sha "$W/pve-$t.ours/disk-$n.raw")" = "$(padsha "${kv#*=}")" ] && pass "pve-$t: $n: our extract sha256 = source (padded)" || fail "pve-$t: $n: our extract differs from source"
  done
  for kv in $cfgs; do cmp -s "$W/pve-$t.ours/$(basename "$kv")" "$kv" && pass "pve-$t: config $(basename "$kv") byte-identical" || fail "pve-$t: config $kv"; done
  "$VMA" list "$a" >"$W/l1" 2>&1; "$OURVMA" list "$a" >"$W/l2" 2>&1
  cmp -s "$W/l1" "$W/l2" && pass "pve-$t: our 'vma list' output identical" || { fail "pve-$t: 'vma list' differs:"; diff "$W/l1" "$W/l2" | sed 's/^/    /'; }
  "$VMA" verify -v "$a" >"$W/l1" 2>&1; "$OURVMA" verify -v "$a" >"$W/l2" 2>&1
  same_out "$W/l1" "$W/l2" && pass "pve-$t: our 'vma verify -v' output identical" || { fail "pve-$t: 'vma verify -v' differs:"; diff "$W/l1" "$W/l2" | head -20 | sed 's/^/    /'; }
  expect 0 "pve-$t: our vma-decode list" "$BIN/vma-decode" list "$a"
  rm -rf "$W/pve-$t.pve" "$W/pve-$t.ours"
}
# our readers on Proxmox's reference fixtures (EXPECTED.txt)
for a in one-disk multi-disk full empty; do
  expect 0 "fixture $a: our vma-verify" "$BIN/vma-verify" "$FIX/pve/$a.vma"
  rm -rf "$W/fxo-$a"
  expect 0 "fixture $a: our vma-decode extract" "$BIN/vma-decode" extract "$FIX/pve/$a.vma" "$W/fxo-$a"
  diff -r "$W/fx-$a" "$W/fxo-$a" >/dev/null && pass "fixture $a: our extract byte-exact to Proxmox's" || fail "fixture $a: our extract differs from Proxmox's"
  "$VMA" verify -v "$FIX/pve/$a.vma" >"$W/l1" 2>&1; "$OURVMA" verify -v "$FIX/pve/$a.vma" >"$W/l2" 2>&1
  same_out "$W/l1" "$W/l2" && pass "fixture $a: our 'vma verify -v' output identical" || { fail "fixture $a: 'vma verify -v' differs:"; diff "$W/l1" "$W/l2" | head | sed 's/^/    /'; }
done
check_pve one-random "drive-scsi0=rand.raw" "qemu-server.conf"
check_pve multi "$ALL" "qemu-server.conf pve-firewall.fw"
check_pve odd "drive-scsi0=odd.raw drive-scsi1=tiny.raw drive-scsi2=small.raw drive-scsi3=sector.raw drive-scsi4=halfzero.raw drive-scsi5=halfhole.raw" "qemu-server.conf"
check_pve configs-only "" "qemu-server.conf pve-firewall.fw"

echo "== $npass passed, $nfail failed"
[ "$nfail" = 0 ]
