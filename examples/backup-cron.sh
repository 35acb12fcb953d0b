#!/usr/bin/env bash
# A nightly backup job: cbw-tap backup | vma-encode | zstd into a directory
# under vzdump's names, verified, the newest N kept, one line for the log.
#
#   examples/backup-cron.sh --control SOCKET --config FILE --dest DIR
#                           [--keep N] [--name NAME]
#
#   --control SOCKET  cbw-tap serve's control socket (PATH.ctl)
#   --config FILE     the VM config to store as qemu-server.conf
#   --dest DIR        where archives go: DIR/NAME-YYYY_MM_DD-HH_MM_SS.vma.zst
#   --keep N          keep the newest N archives of NAME (default 7; 0 keeps all)
#   --name NAME       archive name prefix (default vzdump-qemu-vm)
#
# From the environment (e.g. systemd's EnvironmentFile): BACKUP_PRE and
# BACKUP_POST (shell commands run before and right after the instant, e.g.
# "qm guest cmd 100 fsfreeze-freeze" / "... fsfreeze-thaw"), BACKUP_BWLIMIT
# (bytes per second for the background reader, e.g. 200M), BACKUP_BUFFER
# (default 64M), BACKUP_FLEECING (a fleecing file), ZSTD_LEVEL (default 3).
#
# Prints one line: "backup-cron: OK FILE BYTES bytes in SECONDS s, verified,
# kept N" on stdout and exits 0; or "backup-cron: FAILED NAME: STEP: MESSAGE"
# on stderr and exits 1 (2 for bad arguments). A failed run leaves no file
# under an archive's name and removes no old archive. The tools' own
# messages are kept for that line only. Uses the binaries in $VMA_BIN or on
# PATH. docs/DEPLOY.md sets it up with systemd.
set -uo pipefail
if [ -n "${VMA_BIN:-}" ]; then PATH="$VMA_BIN:$PATH"; fi

control="" config="" dest="" keep=7 name=vzdump-qemu-vm
usage() { echo "backup-cron: $1 (usage: backup-cron.sh --control SOCKET --config FILE --dest DIR [--keep N] [--name NAME])" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --control) control=${2:-}; shift 2 || usage "--control needs a value" ;;
    --config) config=${2:-}; shift 2 || usage "--config needs a value" ;;
    --dest) dest=${2:-}; shift 2 || usage "--dest needs a value" ;;
    --keep) keep=${2:-}; shift 2 || usage "--keep needs a value" ;;
    --name) name=${2:-}; shift 2 || usage "--name needs a value" ;;
    *) usage "unknown argument $1" ;;
  esac
done
[ -n "$control" ] && [ -n "$config" ] && [ -n "$dest" ] || usage "--control, --config and --dest are required"
[[ "$keep" =~ ^[0-9]+$ ]] || usage "--keep $keep: not a number"
[[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || usage "--name $name: use letters, digits, '.', '_', '-'"

started=$(date +%s)
stamp=$(date +%Y_%m_%d-%H_%M_%S)
final="$dest/$name-$stamp.vma.zst"
partial="$dest/.$name-$stamp.vma.zst.partial"
logs=$(mktemp -d "${TMPDIR:-/tmp}/backup-cron.XXXXXX") || { echo "backup-cron: FAILED $name: cannot create a temporary directory" >&2; exit 1; }
cleanup() { rm -rf "$logs"; rm -f "$partial"; }
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

fail() {
  # The step and the first line a tool printed about it.
  local step=$1 file=${2:-} why=""
  if [ -n "$file" ] && [ -s "$file" ]; then why=": $(grep -v '^{' "$file" | grep -v '^cbw-tap backup: \(clusters\|read\|stream\|guest writes\|fleecing\)' | head -n 1)"; fi
  echo "backup-cron: FAILED $name: $step$why" >&2
  exit 1
}

[ -f "$config" ] || fail "config $config: no such file"
if [ -e "$dest" ] && [ ! -d "$dest" ]; then fail "--dest $dest: not a directory"; fi
LC_ALL=C mkdir -p "$dest" 2>"$logs/mkdir" || fail "mkdir $dest" "$logs/mkdir"
[ ! -e "$final" ] || fail "$final exists already (one backup per second)"

args=(--control "$control" --buffer "${BACKUP_BUFFER:-64M}")
[ -n "${BACKUP_BWLIMIT:-}" ] && args+=(--bwlimit "$BACKUP_BWLIMIT")
[ -n "${BACKUP_FLEECING:-}" ] && args+=(--fleecing "$BACKUP_FLEECING")
[ -n "${BACKUP_PRE:-}" ] && args+=(--pre "$BACKUP_PRE")
[ -n "${BACKUP_POST:-}" ] && args+=(--post "$BACKUP_POST")

cbw-tap backup "${args[@]}" 2>"$logs/backup" \
  | vma-encode -c "qemu-server.conf=$config" - 2>"$logs/encode" \
  | zstd -q -"${ZSTD_LEVEL:-3}" -c > "$partial" 2>"$logs/zstd"
status=("${PIPESTATUS[@]}")
# Name the stage that caused the failure: a stage downstream that failed
# makes the ones before it fail too (the consumer is gone), and a failed
# backup makes vma-encode fail (the stream is aborted or cut short).
if [ "${status[2]}" != 0 ]; then
  fail "zstd (exit ${status[2]})" "$logs/zstd"
elif [ "${status[1]}" != 0 ] && { [ "${status[0]}" = 0 ] || grep -q 'the consumer is gone' "$logs/backup"; }; then
  fail "vma-encode (exit ${status[1]})" "$logs/encode"
elif [ "${status[0]}" != 0 ]; then
  fail "cbw-tap backup (exit ${status[0]})" "$logs/backup"
elif [ "${status[1]}" != 0 ]; then
  fail "vma-encode (exit ${status[1]})" "$logs/encode"
fi
sync -f "$partial" 2>/dev/null || true

vma-verify -q "$partial" 2>"$logs/verify" || fail "vma-verify (exit $?)" "$logs/verify"
mv -n "$partial" "$final" 2>"$logs/mv" && [ ! -e "$partial" ] || fail "rename to $final" "$logs/mv"

kept=0
if [ "$keep" -gt 0 ]; then
  # Names sort by time; remove all but the newest $keep.
  mapfile -t old < <(find "$dest" -maxdepth 1 -name "$name-????_??_??-??_??_??.vma.zst" -printf '%f\n' | sort -r | tail -n +"$((keep + 1))")
  for f in "${old[@]}"; do rm -f -- "$dest/$f" || fail "removing $dest/$f"; done
fi
kept=$(find "$dest" -maxdepth 1 -name "$name-????_??_??-??_??_??.vma.zst" | wc -l)
bytes=$(stat -c %s "$final")
echo "backup-cron: OK $final $bytes bytes in $(( $(date +%s) - started )) s, verified, kept $kept"
