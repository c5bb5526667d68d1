#!/usr/bin/env bash
# Kept for the documented form `launch/tpu_pod.sh NAME ZONE [--setup] [options] -- STAGE ARGS...`:
# the launcher is launch/tpu_pod.py (see its --help); --setup is its `--install copy`.
set -euo pipefail
args=()
for a in "$@"; do
  if [[ $a == "--" ]]; then break; fi
  shift
  if [[ $a == "--setup" ]]; then args+=(--install copy); else args+=("$a"); fi
done
exec python3 "$(dirname "$0")/tpu_pod.py" "${args[@]}" "$@"
