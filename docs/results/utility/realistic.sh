#!/bin/sh
# the utility page's realistic command, bf16 autocast (this host has native bf16 / AMX)
exec .venv/bin/python -m scripts.transfer_study --recipes layerwise --task tinyshakespeare --task sst2 \
    --task arc-easy --task agnews --data-root ../shared/data --seeds 0 1 2 --steps 200 \
    --block-size 256 --eval-limit 1000 --mixed-precision bf16 --out runs/realistic
