"""Prototype behind docs/results/transfer-study-gate-bypassed.jsonl: the transfer study with the
transfer-score gate bypassed (the layer-wise fitted emulator is always kept, never the plain drop).
Run from the repository root, with the study's own arguments:
    OMP_NUM_THREADS=2 PYTHONPATH=. python docs/results/gate-bypassed-prototype.py \
        --recipes "layerwise:data=FILE" --out runs/gate
Kept as the record of how those rows were measured; not part of the library."""

import sys

import offsite.emulator.recipe as recipe
import scripts.transfer_study as ts


def fitted_always(dropped, fitted, score, record):
    record["kept"] = "fitted (gate bypassed)"
    return fitted, score(fitted)


if __name__ == "__main__":
    recipe._better_of = fitted_always
    sys.argv = ["transfer_study", *sys.argv[1:]]
    ts.main()
