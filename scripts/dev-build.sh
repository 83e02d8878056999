#!/usr/bin/env bash
# Rebuilds the extension in place for an editable install (`pip install -e .`), with the fast
# `dev-fast` profile (no fat LTO). The new library replaces the old one by rename, so processes
# that have the old one loaded keep running.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --profile dev-fast --features python --lib --message-format=short "$@"
cp target/dev-fast/liblowbit.so python/lowbit/.tmp_lowbit.so
mv python/lowbit/.tmp_lowbit.so python/lowbit/_lowbit.abi3.so
