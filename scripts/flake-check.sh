#!/usr/bin/env bash
# The suite with a busy neighbour: RUNS consecutive runs of the README's test
# command (./scripts/test.sh), each from a fresh clone of this repository's
# HEAD (commit first: uncommitted changes are not in the clone), while another
# process keeps one core busy the whole time. Prints one line per run and a
# summary; exits 1 if any run failed. Each run's output: .flake-check/run-N.log
#
#   ./scripts/flake-check.sh [RUNS]        RUNS defaults to 10
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-10}"
out="$PWD/.flake-check"
rm -rf "$out"
mkdir -p "$out"
rev=$(git rev-parse HEAD)

sh -c 'while :; do :; done' &
busy=$!
trap 'kill "$busy" 2>/dev/null || true' EXIT

pass=0
for i in $(seq 1 "$runs"); do
  dir=$(mktemp -d)
  git clone -q "$PWD" "$dir/repo"
  git -C "$dir/repo" checkout -q "$rev"
  start=$(date +%s)
  if (cd "$dir/repo" && ./scripts/test.sh) >"$out/run-$i.log" 2>&1; then
    result=pass
    pass=$((pass + 1))
  else
    result=FAIL
  fi
  echo "run $i/$runs: $result in $(($(date +%s) - start)) s ($(grep -E '^# (pass|fail) ' "$out/run-$i.log" | tr '\n' ' '))"
  rm -rf "$dir"
done
echo "flake check at ${rev:0:12}: $pass/$runs green with one core kept busy"
[ "$pass" -eq "$runs" ]
