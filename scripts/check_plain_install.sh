#!/usr/bin/env bash
# Issue 19's bar, as CI runs it: a fresh venv, `pip install .` without extras, and the documented
# commands exit 0 from it (plan, explain with a picture and HTML, export to the three trainers).
# Usage: scripts/check_plain_install.sh [workdir]   (default: a new temporary folder)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
# the venv holds a full torch (~6 GB): removed on exit, pass or fail (runs used to fill the disk)
trap 'rm -rf "$work/venv"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --upgrade pip
start=$(date +%s)
"$work/venv/bin/python" -m pip install --quiet "$repo"
echo "== pip install . (no extras): $(( $(date +%s) - start )) s"
cd "$work"
ap="$work/venv/bin/autoplan"
run() { echo "== autoplan $*"; "$ap" "$@" > "$work/last.log" 2>&1 || { cat "$work/last.log"; echo "FAILED: autoplan $*"; exit 1; }; tail -n 1 "$work/last.log"; }
run --help
run plan gpt3-175b --hw dgx-a100-80gb:128 --batch 1536 -o plan.yaml
run explain plan.yaml --picture plan.png --html plan.html
test -s plan.png && test -s plan.html
for target in deepspeed torchtitan megatron; do run export plan.yaml --to "$target"; done
echo "== plain install: every documented command exits 0"
