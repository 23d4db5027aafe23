#!/usr/bin/env bash
# Fuzzes lugh's file readers for a fixed budget and prints, per target, the executions and
# the crashes found. Not part of CI.
#
#   fuzz/run.sh [seconds per target, default 60] [targets..., default: gguf peft]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). libFuzzer's instrumentation takes -Z flags,
# which a stable rustc accepts with RUSTC_BOOTSTRAP=1; set LUGH_FUZZ_TOOLCHAIN=nightly to
# use a nightly toolchain instead. Inputs that crash are kept in fuzz/artifacts/<target>/;
# replay one with `cargo fuzz run <target> <file>`.
set -uo pipefail
cd "$(dirname "$0")/.."

budget="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(gguf peft)

if [ -n "${LUGH_FUZZ_TOOLCHAIN:-}" ]; then
    cargo=(cargo "+$LUGH_FUZZ_TOOLCHAIN" fuzz)
else
    export RUSTC_BOOTSTRAP=1
    cargo=(cargo fuzz)
fi
triple="$(rustc -vV | sed -n 's/^host: //p')"

# Seeds: a tiny model and adapters for it (lugh::fuzzing), written by a helper built like
# the targets so that the dependencies are built once.
"${cargo[@]}" build --release seeds || exit 1
"fuzz/target/$triple/release/seeds" fuzz || exit 1

status=0
for target in "${targets[@]}"; do
    "${cargo[@]}" build --release "$target" || exit 1
    log="fuzz/artifacts/$target.log"
    mkdir -p "fuzz/artifacts/$target"
    # -timeout: an input that runs 10 s is a hang; -rss_limit_mb / -malloc_limit_mb: an
    # allocation of 2 GiB from inputs of 4 KiB is a bug.
    "${cargo[@]}" run --release "$target" "fuzz/corpus/$target" -- \
        -max_total_time="$budget" -max_len=4096 -timeout=10 \
        -rss_limit_mb=2048 -malloc_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1
    rc=$?
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    crashes="$(find "fuzz/artifacts/$target" -type f \( -name 'crash-*' -o -name 'oom-*' \
        -o -name 'timeout-*' -o -name 'leak-*' \) | wc -l)"
    corpus="$(find "fuzz/corpus/$target" -type f | wc -l)"
    echo "$target: ${execs:-?} executions in ${budget}s, corpus $corpus inputs, $crashes crash(es), exit code $rc (log: $log)"
    if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        status=1
        grep -m 5 -E "^(==[0-9]+==ERROR|thread '.*' panicked|.*panicked at)" "$log" || tail -n 20 "$log"
    fi
done
exit $status
