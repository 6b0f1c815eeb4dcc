#!/usr/bin/env bash
# Three nightly cycles on real data: the ham10000-300 images arrive in three batches (by image id, a third a
# night) in the incoming folder of jobs/configs/nightly_ham10000.yaml, and `dermray nightly` runs after each.
# Usage: dev/nightly_ham10000.sh [WORK_DIR]   (default ./dermray-store/nightly-ham10000; wiped first)
# Prints each night's decision; the registry's history.jsonl holds them all.
set -euo pipefail
data=${DERMRAY_TEST_DATA:-../shared/data}
work=${1:-./dermray-store/nightly-ham10000}
dermray=${DERMRAY:-.venv/bin/dermray}
rm -rf "$work" && mkdir -p "$work/incoming"
incoming=$(cd "$work/incoming" && pwd)
ls "$data/ham10000-300/images" | sort > "$work/arrivals.txt"
total=$(wc -l < "$work/arrivals.txt")
for night in 1 2 3; do
    upto=$(( total * night / 3 ))
    head -n "$upto" "$work/arrivals.txt" | tail -n +"$(( total * (night - 1) / 3 + 1 ))" \
        | (cd "$data/ham10000-300/images" && xargs cp -t "$incoming")
    echo "night $night: $(ls "$work/incoming" | wc -l) images arrived so far" >&2
    /usr/bin/time -f "night $night: %e s wall, %M KiB peak (driver)" "$dermray" nightly \
        --config jobs/configs/nightly_ham10000.yaml \
        --set "nightly.labels=$data/metadata/HAM10000_metadata.csv" --set "nightly.images=$work/incoming" \
        --set "nightly.dataset=$work/dataset" --set "nightly.registry=$work/registry" \
        --set "run.storage=$work/runs" > "$work/night$night.json"
    cat "$work/night$night.json"
done
