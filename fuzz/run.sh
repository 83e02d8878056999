#!/usr/bin/env bash
# Fuzzes every parser of untrusted bytes in lowbit for a fixed time per target and prints,
# per target, the executions run and the crashes found (with where their inputs were saved).
#
#   fuzz/run.sh [seconds_per_target] [target ...]      (default: 60 s, every target)
#
# Environment: FUZZ_SANITIZER (address by default; none runs faster without AddressSanitizer),
# FUZZ_TIMEOUT (seconds one input may take before it counts as a hang, default 10),
# FUZZ_RSS_MB (memory limit, default 2048; one allocation past it counts as a crash).
# Exits 1 when anything crashed, hung or ran out of memory (or libFuzzer failed).
set -euo pipefail
export LC_ALL=C # `ls` and `comm` below must agree on the order
cd "$(dirname "$0")"

secs=${1:-60}
shift || true
san=${FUZZ_SANITIZER:-address}
timeout=${FUZZ_TIMEOUT:-10}
rss=${FUZZ_RSS_MB:-2048}

# cargo-fuzz instruments with -Z flags (sanitizer coverage, -Zsanitizer) that only a nightly
# compiler accepts. Use nightly when installed; otherwise RUSTC_BOOTSTRAP=1, the documented
# switch that lets a stable compiler accept them, set here only, for this build.
if rustup run nightly rustc --version >/dev/null 2>&1; then
    fuzz=(cargo +nightly fuzz)
else
    fuzz=(env RUSTC_BOOTSTRAP=1 cargo fuzz)
fi
command -v cargo-fuzz >/dev/null || {
    echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2
    exit 2
}

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# Files the targets write (round trips through `save`) go to RAM when it can, and are removed.
scratch=$(mktemp -d /dev/shm/lowbit-fuzz.XXXXXX 2>/dev/null || mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export TMPDIR=$scratch

# Seeds: small valid inputs written by lowbit itself (an ordinary build, no instrumentation).
cargo run --quiet --example seeds -- corpus
# -a: debug assertions and overflow checks, so that an overflow is a crash, not a wrong count.
mkdir -p artifacts
if ! "${fuzz[@]}" build -a -s "$san" >artifacts/build.log 2>&1; then
    tail -30 artifacts/build.log >&2
    echo "the fuzz build failed (fuzz/artifacts/build.log)" >&2
    exit 2
fi
bin_dir=target/$(rustc -vV | sed -n 's/^host: //p')/release

total_crashes=0
failed=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log=artifacts/$t/last-run.log
    : >"$log"
    execs=0
    found=()
    start=$SECONDS
    # libFuzzer stops at the first crash; go on with what is left of the budget (a few times
    # at most, so that an input that always crashes does not spin).
    for _ in 1 2 3 4 5 6 7 8; do
        left=$((secs - (SECONDS - start)))
        [ "$left" -gt 0 ] || break
        before=$(ls "artifacts/$t")
        set +e
        "$bin_dir/$t" "corpus/$t" -max_total_time="$left" -timeout="$timeout" \
            -rss_limit_mb="$rss" -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
            >>"$log" 2>&1
        rc=$?
        set -e
        n=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo 0)
        execs=$((execs + n))
        # Each run's stats are counted once: mark them as read.
        sed -i 's/stat::number_of_executed_units/counted::number_of_executed_units/' "$log"
        new=$(comm -13 <(echo "$before") <(ls "artifacts/$t") |
            grep -E '^(crash|timeout|oom|leak)-' || true)
        for f in $new; do found+=("fuzz/artifacts/$t/$f"); done
        if [ "$rc" -eq 0 ]; then break; fi
        if [ -z "$new" ]; then
            echo "$t: libFuzzer exited with $rc without saving an input; see fuzz/$log" >&2
            failed=1
            break
        fi
    done
    total_crashes=$((total_crashes + ${#found[@]}))
    line="$t: $execs executions in $((SECONDS - start)) s, ${#found[@]} crashes"
    summary+=("$line")
    echo "$line"
    for f in "${found[@]}"; do
        echo "    $f  (reproduce from the repo root: ${fuzz[*]} run -a -s $san $t $f)"
    done
done

echo
echo "summary (${secs} s per target, sanitizer: $san):"
printf '  %s\n' "${summary[@]}"
echo "  crashes found: $total_crashes"
[ "$total_crashes" -eq 0 ] && [ "$failed" -eq 0 ]
