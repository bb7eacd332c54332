"""The shipped model per archive and backbone: fp32 against INT8 on the test split, and each
engine's speed, in one run on one machine.

    python -m bench.export [--archives hymenoptera_data,trashnet,blood_cells] [--backbones efficientnet_lite0,...]

Run it in a throwaway clone (git clone, link .venv); the archives are ../shared/datasets/*.zip.
For each archive and backbone, one `dvc exp run` to the latency stage with strategy frozen (the
head on the pretrained backbone: INT8's behaviour is the backbone's, and frozen keeps the bench
short; a fine-tuned model goes through the same export), then metrics/export/summary.json and
metrics/latency.json are read. Writes bench/results/export.md and docs/model.md's `export`
block, and restores the clone's params, lock file and outputs afterwards.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

from bench.defaults import SHARED
from bench.publish import machine, publish
from bench.workspace import restored_workspace, run_on_archive

RESULTS = Path("bench/results/export.md")
ENGINES = ("torch_fp32", "onnx_fp32", "onnx_int8")


def measured(archive: str, backbone: str) -> dict:
    run_on_archive(SHARED / f"{archive}.zip", ["strategy=frozen", f"model.backbone={backbone}"],
                   ["release/dvc.yaml:latency"])
    export = json.loads(Path("metrics/export/summary.json").read_text())
    speed = json.loads(Path("metrics/latency.json").read_text())
    row = {"archive": archive, "backbone": backbone, **export, **speed}
    print(json.dumps(row), flush=True)
    return row


def speed_cell(row: dict, engine: str) -> str:
    if f"{engine}_latency_ms_median" not in row:
        return "- (not shipped)"
    return (f"{row[f'{engine}_latency_ms_median']:.1f} ms (p90 {row[f'{engine}_latency_ms_p90']:.1f}), "
            f"{row[f'{engine}_images_per_s_batch32']:.0f}/s")


def table(rows: list[dict]) -> str:
    threads = rows[0]["threads"]
    lines = [f"Measured {date.today().isoformat()} on {machine()} by `python -m bench.export` (one run; strategy "
             f"frozen; {threads} threads; latency: median batch-1 milliseconds (p90) of 20 runs after warm-up; "
             "then images per second in batches of 32). INT8 ships if its test accuracy is at most 0.005 below "
             "fp32's.", "",
             "| archive | backbone | fp32 test accuracy | INT8 test accuracy | INT8 agrees with fp32 | INT8 shipped | "
             "PyTorch fp32 | ONNX Runtime fp32 | ONNX Runtime INT8 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['archive']} | {row['backbone']} ({row['input_size']} px) | "
                     f"{row['fp32_test_accuracy']:.4f} | {row['int8_test_accuracy']:.4f} | "
                     f"{row['int8_agreement']:.4f} | "
                     f"{'yes' if row['int8_shipped'] else 'no'} | "
                     + " | ".join(speed_cell(row, engine) for engine in ENGINES) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archives", default="hymenoptera_data,trashnet,blood_cells")
    parser.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite2")
    args = parser.parse_args()
    rows = []
    with restored_workspace():
        for archive in args.archives.split(","):
            for backbone in args.backbones.split(","):
                rows.append(measured(archive, backbone))
    publish("export", table(rows), RESULTS)


if __name__ == "__main__":
    main()
