# Sourced by examples/*.sh and benches/*.sh: puts the vma-tools binaries on
# PATH and sets VMA_BIN to their directory.
#
#   root=… ; . "$root/scripts/vma-bin.sh"
#
# With $VMA_BIN set, its binaries are used as they are. Otherwise they are
# built with cargo (its progress shown on stderr; a first build takes a few
# minutes) in the profile $VMA_PROFILE (default release), and found where
# cargo put them: its target directory as `cargo metadata` reports it, so
# CARGO_TARGET_DIR, .cargo/config.toml's build.target-dir and the default
# target/ all work.
if [ -z "${VMA_BIN:-}" ]; then
  vma_profile=${VMA_PROFILE:-release}
  echo "== building the vma-tools binaries (cargo build --profile $vma_profile)" >&2
  cargo build --profile "$vma_profile" --manifest-path "$root/Cargo.toml" --bins >&2
  vma_target=$(cargo metadata --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  # The dev profile's directory is named debug.
  [ "$vma_profile" = dev ] && vma_profile=debug
  VMA_BIN="$vma_target/$vma_profile"
  unset vma_profile vma_target
fi
if [ ! -d "$VMA_BIN" ]; then
  echo "error: VMA_BIN=$VMA_BIN: no such directory" >&2
  exit 3
fi
PATH="$VMA_BIN:$PATH"
export VMA_BIN
