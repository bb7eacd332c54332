"""How many val images a temperature needs: fitted on n of them, does it calibrate the others?

    python -m bench.temperature [--archives hymenoptera_data,blood_cells,trashnet] [--draws 300]

Run it in a throwaway clone whose pipeline is reproduced and committed. For each archive (from the
datasets folder beside the project, as bench.defaults), a frozen model is trained as a DVC
experiment; then, on its val split's probabilities, for each n: `--draws` random subsets of n
images, a temperature fitted on each (lib/calibration.fit_temperature, as the train stage does)
and the NLL of the remaining val images with it against without it (temperature 1). A fit that
is right on n images lowers the others' NLL. Writes bench/results/temperature.md and the
`temperature` block of docs/stages.md: the floor under which train keeps temperature 1
(lib/training.MIN_VAL_IMAGES_FOR_TEMPERATURE) comes from this table.
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

import numpy as np

from bench.defaults import SHARED
from bench.publish import machine, publish
from bench.workspace import restored_workspace, run_on_archive

RESULTS = Path("bench/results/temperature.md")
SIZES = (5, 10, 15, 20, 30, 50, 100)


def val_probabilities() -> tuple[np.ndarray, np.ndarray]:
    from stages.lib.checkpoint import read_checkpoint
    from stages.lib.features import read_features
    from stages.lib.head import feature_probabilities
    from stages.lib.paths import MODEL

    checkpoint = read_checkpoint(MODEL)
    val = read_features("val")
    return feature_probabilities(checkpoint.head_layers(), val, checkpoint.tta), val["labels"]


def draws_for(probs: np.ndarray, labels: np.ndarray, n: int, draws: int, rng) -> dict:
    from stages.lib.calibration import fit_temperature, negative_log_likelihood, softmax

    log_probs = np.log(np.clip(probs, 1e-12, None))
    temperatures, better = [], []
    for _ in range(draws):
        chosen = rng.choice(len(labels), n, replace=False)
        rest = np.setdiff1d(np.arange(len(labels)), chosen)
        t = fit_temperature(log_probs[chosen], labels[chosen])
        temperatures.append(t)
        better.append(negative_log_likelihood(softmax(log_probs[rest] / t), labels[rest])
                      < negative_log_likelihood(probs[rest], labels[rest]))
    low, median, high = np.percentile(temperatures, [10, 50, 90])
    return {"n": n, "better": float(np.mean(better)), "low": low, "median": median, "high": high}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archives", default="hymenoptera_data,blood_cells,trashnet")
    parser.add_argument("--draws", type=int, default=300)
    args = parser.parse_args()
    rows = []
    with restored_workspace():
        for name in args.archives.split(","):
            run_on_archive(SHARED / f"{name}.zip", ["strategy=frozen"])
            probs, labels = val_probabilities()
            full = draws_for(probs, labels, len(labels) - 1, 1, np.random.default_rng(0))
            for n in [s for s in SIZES if s < len(labels) - 10]:
                row = draws_for(probs, labels, n, args.draws, np.random.default_rng(n))
                rows.append({"archive": name, "val": len(labels), "full": full["median"], **row})
                print(rows[-1], flush=True)
    lines = [f"Measured {date.today().isoformat()} on {machine()} by `python -m bench.temperature` (a frozen model per "
             f"archive; {args.draws} random draws of n val images each: the temperature fitted on them, and whether "
             "it lowers the NLL of the other val images against temperature 1).", "",
             "| archive | val images | n | fitted on n: lower NLL on the rest | temperature, 10th-90th percentile "
             "(median) | fitted on all val |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['archive']} | {r['val']} | {r['n']} | {100 * r['better']:.0f}% | "
              f"{r['low']:.2f} to {r['high']:.2f} ({r['median']:.2f}) | {r['full']:.2f} |" for r in rows]
    publish("temperature", "\n".join(lines), RESULTS)


if __name__ == "__main__":
    main()
