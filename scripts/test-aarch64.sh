#!/usr/bin/env bash
# Builds lowbit's Rust core for aarch64 (the NEON code paths) and runs `cargo test` under
# qemu-user. Everything comes from Debian's packages: rustc-web / cargo-web (a recent Rust whose
# aarch64 standard library Debian ships as libstd-rust-web-dev:arm64), the cross linker and the
# emulator. Run as root on Debian 12 (bookworm) x86-64; pass extra cargo arguments through.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! dpkg -s libstd-rust-web-dev:arm64 >/dev/null 2>&1; then
    dpkg --add-architecture arm64
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rustc-web cargo-web \
        libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
fi
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/aarch64}"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64
# ARMv8.2-A half precision: the gemm crate's aarch64 kernels carry fp16 instructions. Static
# linking: under qemu-user, a dynamically linked aarch64 program here hangs in its first
# pthread_create (a plain C program too), a statically linked one runs.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+fp16,+crt-static"
/usr/bin/cargo --version
qemu-aarch64 --version | head -1
/usr/bin/cargo test --target aarch64-unknown-linux-gnu --profile dev-fast "$@"
