#!/bin/sh
# The utility page's realistic rows: each arm over three seeds, 200 steps of 4x256 tokens,
# bf16 autocast (this host has native bf16 / AMX). Run from the project root; needs ../shared/data.
# Every arm appends to runs/realistic/rows.jsonl and shares the full-model ceilings in
# runs/realistic/ceilings.json; a stopped run resumes from them (the rows it has are skipped). To go on
# from the committed rows: mkdir -p runs/realistic && cp docs/results/utility/rows.jsonl \
#   docs/results/utility/ceilings.json runs/realistic/
# An arm on four tasks takes 75-100 minutes on 2 cores; the arms run one at a time.
set -e
ALL="--task tinyshakespeare --task sst2 --task arc-easy --task agnews"
run() {
    .venv/bin/python -m scripts.transfer_study --data-root ../shared/data --seeds 0 1 2 --steps 200 \
        --block-size 256 --eval-limit 1000 --mixed-precision bf16 --out runs/realistic \
        --reference "layerwise lr=1e-3" "layerwise lr=3e-4" "$@"
}
run $ALL --recipes layerwise --learning-rate 1e-3              # the old default
run $ALL --recipes layerwise --learning-rate 3e-4              # the adapter's learning rate
# the other arms at the adapter learning rate the two above chose (3e-4), in the order they were
# first run; each arm is one line, so its emulator is built once for all its tasks
run $ALL --recipes harmonizer --learning-rate 3e-4   # the other kind of emulator
# a ten times larger owner sample; the transfer-score gate shipped the plain drop instead of the fit
run --task tinyshakespeare --recipes layerwise-1mb --learning-rate 3e-4
# depth: a third of the middle kept, first where half depth loses the margin floor
run --task sst2 --task agnews --task tinyshakespeare --task arc-easy --recipes layerwise-k9 --learning-rate 3e-4
# the 1 MB fit itself (gate off), where the gate shipped the drop above; SST-2 is not run yet
run $ALL --recipes layerwise-1mb-fitted --learning-rate 3e-4
