#!/usr/bin/env bash
# Fuzz the parsers of outside input, the dialect translators and the admission arithmetic
# (README: `make fuzz`; CI runs a short pass from scripts/test.sh).
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] (default 600). Needs a nightly toolchain;
# installs cargo-fuzz once when it is missing.
# Each target starts from its committed seeds (fuzz/corpus/<target>/) copied into a scratch
# corpus outside the repository, which later runs keep growing; crashing inputs land there
# too. MODELGATE_FUZZ_TARGETS="sse admission" runs a subset, MODELGATE_FUZZ_DIR moves the
# scratch directory. Exits 1 when a target crashes, naming the input.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SECONDS_PER_TARGET=${1:-600}
ALL_TARGETS="request sse snapshot admission messages_request
  translate_request_openai_anthropic translate_request_anthropic_openai
  translate_stream_anthropic_openai translate_stream_openai_anthropic translate_error
  translate_request_responses translate_stream_bedrock translate_stream_gemini
  translate_stream_responses cloud_credentials cache_entry redis_reply mask"
TARGETS=${MODELGATE_FUZZ_TARGETS:-$ALL_TARGETS}
DIR=${MODELGATE_FUZZ_DIR:-${TMPDIR:-/tmp}/modelgate-fuzz}
CARGO_FUZZ_VERSION=0.13.2

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: skipped, no nightly toolchain (rustup toolchain install nightly)"
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io (cargo install --locked; about a minute, once)"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

echo "fuzz: building the targets (nightly, address sanitizer; a few minutes the first time)"
cargo +nightly fuzz build --fuzz-dir fuzz

failed=()
for t in $TARGETS; do
  corpus="$DIR/corpus/$t" artifacts="$DIR/artifacts/$t" log="$DIR/logs/$t.log"
  mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
  cp fuzz/corpus/"$t"/* "$corpus"/
  echo "fuzz: $t for ${SECONDS_PER_TARGET}s on $corpus (log: $log)"
  status=0
  cargo +nightly fuzz run --fuzz-dir fuzz "$t" "$corpus" -- \
    -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" >"$log" 2>&1 || status=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -1)
  if [ "$status" -eq 0 ]; then
    echo "fuzz: $t ok: ${runs:-?} runs, ${speed:-?}/s, ${cov:-no coverage line}"
  else
    input=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    grep -m1 -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer" -A2 "$log" | sed 's/^/  /' || true
    echo "fuzz: $t FAILED (exit $status); input: ${input:-none written, see $log}"
    [ -n "$input" ] && echo "fuzz:   reproduce: cargo +nightly fuzz run --fuzz-dir fuzz $t $input"
    failed+=("$t")
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: failed: ${failed[*]}"
  exit 1
fi
