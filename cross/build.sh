#!/usr/bin/env bash
# Builds release picket-agent binaries for x86_64, aarch64 (Pi 3/4/5 with a 64-bit OS) and
# armv7 (32-bit Raspberry Pi OS) with Debian's cross toolchains. No Docker.
#
#   cross/build.sh [--install] [TARGET...]
#
# --install  installs the Debian cross toolchains and rustup targets first (needs root).
# Binaries land in $CARGO_TARGET_DIR (default: target/)/<target>/release/picket-agent and are
# copied to dist/picket-agent-<target>.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_TARGETS=(x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)

install=0
targets=()
for arg in "$@"; do
  case "$arg" in
    --install) install=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) targets+=("$arg") ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")

if [ "$install" = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf \
    libc6-dev-arm64-cross libc6-dev-armhf-cross >/dev/null
  # wasm32-wasip2: agent/build.rs builds the embedded first-party plugins.
  rustup target add aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf wasm32-wasip2 >/dev/null
fi

target_dir="${CARGO_TARGET_DIR:-target}"
mkdir -p dist
for target in "${targets[@]}"; do
  case "$target" in
    aarch64-unknown-linux-gnu)
      # ring and zstd compile C: point the cc crate at the cross compiler.
      export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
      export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar ;;
    armv7-unknown-linux-gnueabihf)
      export CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc
      export AR_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-ar ;;
    x86_64-unknown-linux-gnu) ;;
    *) echo "unsupported target: $target (supported: ${ALL_TARGETS[*]})" >&2; exit 2 ;;
  esac
  echo "==> building picket-agent for $target"
  order="agent/symbol-order/$target.txt"
  out_dir="$(realpath -m "$target_dir/$target/release")"
  if [ -f "$order" ]; then
    # The trained symbol order (agent/build.rs; docs/performance.md, "Agent memory"), and
    # lld's link map, which tells how much of it this build's symbols still match.
    PICKET_SYMBOL_ORDER=on PICKET_LINK_MAP="$out_dir/picket-agent.map" \
      cargo build --locked --release -p picket-agent --target "$target"
    listed=$(grep -vc '^#' "$order")
    found=$(awk 'NR == FNR { if ($0 !~ /^#/) want[$0] = 1; next }
                 NF == 5 && ($5 in want) { delete want[$5]; n++ }
                 END { print n + 0 }' "$order" "$out_dir/picket-agent.map")
    echo "symbol order: $found of the $listed functions in $order are in this build"
    if [ $((found * 10)) -lt $((listed * 9)) ]; then
      echo "warning: the symbol order is stale; train it again (docs/performance.md, How to reproduce)" >&2
    fi
  else
    cargo build --locked --release -p picket-agent --target "$target"
  fi
  cp "$out_dir/picket-agent" "dist/picket-agent-$target"
  ls -l "dist/picket-agent-$target"
done
