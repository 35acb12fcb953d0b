#!/usr/bin/env bash
# What the progress bar costs: vma-verify and vma-decode extract of the same
# archive with stderr a pseudo terminal (bar drawn) and not (no bar), and
# `cat` of the archive as the baseline, each the best of RUNS.
#
#   benches/progress.sh [WORKDIR]     (SIZE=256M default, RUNS=3)
#
# Ratios: time with the bar / time without (1.00 = free); both runs under
# script(1), stderr a terminal only for the bar.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/vma-bin.sh"
SIZE=${SIZE:-256M}
RUNS=${RUNS:-3}
if [ -n "${1:-}" ]; then work=$1; mkdir -p "$work"; else work=$(mktemp -d /var/tmp/vma-progress.XXXXXX); trap 'rm -rf "$work"' EXIT; fi
cd "$work"
truncate -s "$SIZE" d.raw
head -c "$(( $(numfmt --from=iec "$SIZE") / 2 ))" /dev/urandom | dd of=d.raw conv=notrunc status=none
vma-encode -o a.vma drive-scsi0=d.raw 2>/dev/null
best() {
  local b="" t0 t1 t
  for _ in $(seq "$RUNS"); do
    t0=$(date +%s.%N); bash -c "$1" >/dev/null 2>&1; t1=$(date +%s.%N)
    t=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    if [ -z "$b" ] || awk -v t="$t" -v b="$b" 'BEGIN { exit !(t < b) }'; then b=$t; fi
  done
  echo "$b"
}
tty() { echo "script -qec '$1' /dev/null"; }
cat_t=$(best "cat a.vma > /dev/null")
# Both under script(1), the same pseudo terminal; without the bar stderr
# goes to /dev/null (not a terminal: no bar), so only the bar differs.
v0=$(best "$(tty "vma-verify a.vma 2>/dev/null")")
v1=$(best "$(tty "vma-verify a.vma")")
e0=$(best "$(tty "rm -rf o; vma-decode extract a.vma o 2>/dev/null")")
e1=$(best "$(tty "rm -rf o; vma-decode extract a.vma o")")
r() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
printf '== progress bar cost, %s archive (%s bytes), best of %s\n' "$SIZE" "$(stat -c %s a.vma)" "$RUNS"
printf '  %-28s %7s s\n' "cat (baseline)" "$cat_t"
printf '  %-28s %7s s   with bar %7s s   ratio %s\n' "vma-verify" "$v0" "$v1" "$(r "$v1" "$v0")"
printf '  %-28s %7s s   with bar %7s s   ratio %s\n' "vma-decode extract" "$e0" "$e1" "$(r "$e1" "$e0")"
