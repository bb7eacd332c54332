"""Head-only experiments: where the seconds of `dvc exp run -S train.lr=X` go, cold and warm.

    python -m bench.head_only

Every experiment is head-only: strategy frozen (`-S strategy=frozen`; under the default, auto, a new
train.lr also retrains the network phase) and a new train.lr.
Run it in a throwaway clone whose pipeline is reproduced (`dvc repro`) and committed. In one run
on one machine it measures:
1. `python -c "import torch"` (median of three);
2. each stage process of a head-only experiment (train.lr changed in params.yaml), run as DVC runs
   it, `python -m stages NAME`: cold (DVC_TRANSFER_WARM=0, a new interpreter imports everything)
   and warm (stages/lib/warm.py);
3. DVC's own share: `dvc exp run` and `dvc repro` when only the always-changed source stage runs;
4. the whole `dvc exp run -S train.lr=X`, three different X each way, warm then cold: the median.
Writes bench/results/head_only.md and README's `head-only` block, and restores params.yaml,
dvc.lock and the outputs afterwards.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from bench.readme_table import publish
from bench.workspace import restored_workspace

RESULTS = Path("bench/results/head_only.md")
STAGES = ("check_params", "source", "train", "evaluate", "export")
COLD = {"DVC_TRANSFER_WARM": "0"}
LR_LINE = re.compile(r"^(  lr: )(\S+)", re.M)
STRATEGY_LINE = re.compile(r"^strategy: \S+", re.M)
FROZEN = ["-S", "strategy=frozen"]


def timed(command: list[str], env: dict | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stdout)
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}")
    return seconds, done.stdout


def set_lr(lr: float) -> None:
    params = Path("params.yaml")
    text = STRATEGY_LINE.sub("strategy: frozen", params.read_text(), count=1)
    params.write_text(LR_LINE.sub(lambda m: f"{m.group(1)}{lr:g}", text, count=1))


def stage_seconds(lr: float, env: dict) -> dict[str, float]:
    """Each stage of a head-only experiment as its own process, in the pipeline's order."""
    set_lr(lr)
    return {stage: timed([sys.executable, "-m", "stages", stage], env)[0] for stage in STAGES}


def experiment_seconds(lr: float, env: dict) -> tuple[float, list[str], float]:
    seconds, output = timed(["dvc", "exp", "run", *FROZEN, "-S", f"train.lr={lr:g}"], env)
    ran = re.findall(r"Running stage '(\w+)'", output)
    accuracy = json.loads(Path("metrics/eval.json").read_text())["accuracy"]
    print(f"dvc exp run -S train.lr={lr:g} ({'cold' if env else 'warm'}): {seconds:.2f} s, ran {', '.join(ran)}, "
          f"test accuracy {accuracy:.4f}", flush=True)
    return seconds, ran, accuracy


def ensure_warm_server() -> None:
    timed([sys.executable, "-m", "stages", "check_params"])  # run cold if there is no server: it leaves one
    deadline = time.monotonic() + 120
    while "up" not in timed([sys.executable, "-m", "stages.lib.warm", "status"])[1]:
        if time.monotonic() > deadline:
            raise SystemExit("the warm server did not start; see python -m stages.lib.warm status")
        time.sleep(0.5)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def table(torch_import: float, cold: dict, warm: dict, dvc_only: dict, runs: dict, ran: list[str],
          accuracies: list[float]) -> str:
    def cell(values: list[float]) -> str:
        return f"**{statistics.median(values):.1f} s** ({', '.join(f'{v:.1f}' for v in values)})"

    rows = [("`python -c \"import torch\"`", f"{torch_import:.2f} s", "-")]
    rows += [(f"`python -m stages {s}`", f"{cold[s]:.2f} s", f"{warm[s]:.2f} s") for s in STAGES]
    rows.append(("the five stage processes", f"{sum(cold.values()):.1f} s", f"{sum(warm.values()):.1f} s"))
    rows.append(("`dvc exp run`, only source to run", f"{dvc_only['exp cold']:.1f} s", f"{dvc_only['exp warm']:.1f} s"))
    rows.append(("`dvc repro`, only source to run", f"{dvc_only['repro cold']:.1f} s",
                 f"{dvc_only['repro warm']:.1f} s"))
    rows.append(("**`dvc exp run -S train.lr=X`**, median of three X", cell(runs["cold"]), cell(runs["warm"])))
    rows.append(("of which DVC's own work (the median minus the stage processes)",
                 f"{statistics.median(runs['cold']) - sum(cold.values()):.1f} s",
                 f"{statistics.median(runs['warm']) - sum(warm.values()):.1f} s"))
    lines = [f"Measured {date.today().isoformat()} on {cpu_name()}, {os.cpu_count()} cores, by "
             "`python -m bench.head_only` (one run; hymenoptera, strategy frozen, every experiment a new "
             f"train.lr; stages run: {', '.join(ran)}; test accuracy of the six experiments "
             f"{min(accuracies):.4f} to {max(accuracies):.4f}).", "",
             "| | cold: a new interpreter per stage | warm: stages/lib/warm.py |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main() -> None:
    status = subprocess.run(["git", "status", "--porcelain", "--", "params.yaml", "dvc.lock"], capture_output=True,
                            text=True).stdout
    if status.strip():
        raise SystemExit("params.yaml or dvc.lock has uncommitted changes; commit them first: the bench runs "
                         "experiments in the workspace and restores it afterwards")
    with restored_workspace():
        torch_import = statistics.median(timed([sys.executable, "-c", "import torch"])[0] for _ in range(3))
        ensure_warm_server()
        lrs = iter([0.00153, 0.00171, 0.00189, 0.00207, 0.00226, 0.00244, 0.00262, 0.00281])
        cold = stage_seconds(next(lrs), COLD)
        warm = stage_seconds(next(lrs), {})
        print(f"stages cold {cold}\nstages warm {warm}", flush=True)
        subprocess.run(["git", "checkout", "--", "params.yaml"], check=True)
        dvc_only = {}
        for name, env in (("warm", {}), ("cold", COLD)):
            timed(["dvc", "exp", "run", *FROZEN], env)  # brings the workspace back to the committed lr
            dvc_only[f"exp {name}"] = timed(["dvc", "exp", "run", *FROZEN], env)[0]
            dvc_only[f"repro {name}"] = timed(["dvc", "repro"], env)[0]
        print(f"DVC alone {dvc_only}", flush=True)
        runs, accuracies, ran = {"warm": [], "cold": []}, [], []
        for name, env in (("warm", {}), ("cold", COLD)):
            for _ in range(3):
                seconds, ran, accuracy = experiment_seconds(next(lrs), env)
                runs[name].append(seconds)
                accuracies.append(accuracy)
    publish("head-only", table(torch_import, cold, warm, dvc_only, runs, ran, accuracies), RESULTS)


if __name__ == "__main__":
    main()
