"""Speed and memory against the recipe: one command, same data, backbone and machine, same run.

    python -m bench.speed [--backbone NAME] [--recipe-epochs 25] [--index-images 5000]

Runs, in order, and prints what each took and the ratios the README reports:
1. the backbone's forward throughput (images/s; eager as the recipe runs it, and traced and
   frozen as the features stage runs it), the physical floor of any frozen run;
2. the recipe's frozen loop (bench/recipe.py: batch 4, SGD, StepLR, 25 epochs), then ours:
   `dvc exp run -S strategy=frozen` with weights, features, train and evaluate forced (the data
   stages cached), then three follow-up experiments that each change only train.lr;
3. the recipe's finetune loop, then ours (`-S strategy=finetune`, the same four stages forced),
   with where the training time went (waiting for data vs compute);
4. peak memory of EfficientNet-Lite0 finetuning at the default batch size;
5. the index stage on generated JPEGs (bench/index_speed.py), at two sizes to show flat memory.

Experiments run in the workspace (a temporary copy would add its set-up to our time), so the
bench needs params.yaml, dvc.lock and metrics/ unmodified, and restores them at the end.
Results go to bench/results/speed.md and the README's speed section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import psutil
import torch

from bench.publish import publish
from bench.workspace import timed
from stages.lib.params import load_params
from stages.lib.runtime import cpu_autocasts

RESULTS = Path("bench/results/speed.md")
TRACKED = ["params.yaml", "dvc.lock", "metrics"]


@contextmanager
def peak_rss(pattern: str):
    """Track the peak memory (MB; proportional set size, so pages shared with data-loader workers
    count once) of processes whose command line matches `pattern` and of their children, each
    process once; yields a dict filled in on exit."""
    result = {"peak_mb": 0.0}
    done = threading.Event()

    def poll():
        while not done.is_set():
            family: dict[int, psutil.Process] = {}
            for process in psutil.process_iter(["cmdline"]):
                try:
                    if re.search(pattern, " ".join(process.info["cmdline"] or [])):
                        family.update({p.pid: p for p in [process, *process.children(recursive=True)]})
                except psutil.Error:
                    continue
            total = 0
            for process in family.values():  # each process once; PSS splits pages shared with workers
                try:
                    total += getattr(process.memory_full_info(), "pss", process.memory_info().rss)
                except psutil.Error:
                    continue
            result["peak_mb"] = max(result["peak_mb"], total / 2**20)
            done.wait(0.2)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()



def timed_echo(command: list[str]) -> tuple[float, str]:
    """A command timed, printed first: this bench's log says what ran."""
    return timed(command, echo=True)

def experiment(stages: list[str], *settings: str) -> tuple[float, list[str]]:
    """`dvc exp run` in the workspace; `stages` are forced. Returns wall time and the stages run."""
    overrides = [arg for setting in settings for arg in ("-S", setting)]
    forced = ["-f", "-s", *stages] if stages else []
    seconds, output = timed_echo(["dvc", "exp", "run", *overrides, *forced])
    ran = re.findall(r"Running stage '(\w+)'", output)
    print(f"  {seconds:.1f} s, stages run: {', '.join(ran) or 'none'}", flush=True)
    return seconds, ran


def read_json(path: str) -> dict:
    return json.loads(Path(path).read_text())


def forward_throughput(backbone: str, batch_size: int, seconds: float = 10.0) -> dict[str, float]:
    """Images per second through the backbone alone, on random input of its own size."""
    from stages.lib.backbones import create_backbone, preprocessing_for, resolve_backbone
    from stages.lib.extraction import inference_graph

    model, _ = create_backbone(resolve_backbone(backbone))
    model.eval().to(memory_format=torch.channels_last)
    size = preprocessing_for(backbone, "pretrained").input_size
    batch = torch.randn(batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    rates = {}
    for name, runner in (("eager", model), ("traced", inference_graph(model, batch))):
        with torch.inference_mode():
            for _ in range(3):
                runner(batch)
            started, images = time.perf_counter(), 0
            while time.perf_counter() - started < seconds:
                runner(batch)
                images += batch_size
        rates[name] = images / (time.perf_counter() - started)
    return rates


def recipe(strategy: str, backbone: str, epochs: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        seconds, _ = timed_echo([sys.executable, "-m", "bench.recipe", "--strategy", strategy, "--backbone", backbone,
                            "--epochs", str(epochs), "--json", out.name])
        result = json.loads(Path(out.name).read_text())
    print(f"  recipe {strategy}: {seconds:.0f} s, best val {result['best_val_accuracy']:.4f}", flush=True)
    return {**result, "wall": seconds}


def forward_passes() -> int:
    """Backbone inputs the features stage ran: images times views, over all splits."""
    from stages.lib.features import read_features

    shapes = [read_features(split)["features"].shape for split in ("train", "val", "test")]
    return sum(images * views for images, views, _ in shapes)


def start_up_seconds() -> float:
    """What a frozen run costs besides the backbone: DVC checking the pipeline, and each of the
    four stages starting Python and importing its libraries."""
    seconds, _ = timed_echo(["dvc", "repro"])  # everything up to date: DVC's own overhead
    for stage in ("weights", "features", "train", "evaluate"):
        # As `python -m stages NAME` imports it: collection off while importing (stages/__main__.py).
        seconds += timed_echo([sys.executable, "-c", f"import gc; gc.disable(); import stages.{stage}; gc.freeze()"])[0]
    return seconds


def index_speed(images: int) -> tuple[float, float]:
    _, output = timed_echo([sys.executable, "-m", "bench.index_speed", "--images", str(images)])
    rate, peak = re.search(r"= (\d+) images/s .* peak RSS of one process (\d+) MB", output).groups()
    return float(rate), float(peak)


def workspace_is_clean() -> bool:
    status = subprocess.run(["git", "status", "--porcelain", "--", *TRACKED], capture_output=True, text=True)
    return status.returncode == 0 and not status.stdout.strip()


def restore_workspace() -> None:
    subprocess.run(["git", "checkout", "--", *TRACKED], check=True)
    subprocess.run(["dvc", "checkout", "--force"], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", help="default: params.yaml's model.backbone")
    parser.add_argument("--recipe-epochs", type=int, default=25)
    parser.add_argument("--index-images", type=int, default=5000)
    args = parser.parse_args()
    if not workspace_is_clean():
        raise SystemExit(f"{', '.join(TRACKED)} have uncommitted changes; commit or stash them, "
                         "since the bench runs experiments in the workspace and restores it afterwards")
    params = load_params()
    backbone = args.backbone or params.model.backbone
    # Each experiment starts from the workspace the one before left: set what could differ.
    settings = [f"model.backbone={backbone}", f"train.lr={params.train.lr:g}"]
    timed_echo(["dvc", "repro", "index"])  # the data stages, cached from here on

    try:
        rates = forward_throughput(backbone, params.features.batch_size)
        print(f"forward throughput: eager {rates['eager']:.1f} images/s, traced {rates['traced']:.1f}", flush=True)

        recipe_frozen = recipe("frozen", backbone, args.recipe_epochs)
        forced = ["check", "weights", "features", "train", "evaluate"]
        frozen_wall, _ = experiment(forced, "strategy=frozen", *settings)
        frozen_eval = read_json("metrics/eval.json")
        passes = forward_passes()
        # Learning rates no earlier run used: otherwise DVC's run-cache restores the export
        # stage's outputs instead of running it, and a follow-up looks faster than a user's.
        # Three of them, since a dozen seconds move with the machine's load.
        follow_lrs = [float(f"{params.train.lr * random.uniform(1.5, 2.5):.3g}") for _ in range(3)]
        follow_walls, follow_accuracies = [], []
        for lr in follow_lrs:
            wall, follow_ran = experiment([], "strategy=frozen", f"model.backbone={backbone}", f"train.lr={lr:g}")
            follow_walls.append(wall)
            follow_accuracies.append(read_json("metrics/eval.json")["accuracy"])
        start_up = start_up_seconds()

        recipe_finetune = recipe("finetune", backbone, args.recipe_epochs)
        with peak_rss(r"-m stages[. ]train") as finetune_memory:
            finetune_wall, _ = experiment(forced, "strategy=finetune", *settings)
        finetune_eval = read_json("metrics/eval.json")
        finetune_time = read_json("metrics/train/time.json")

        with peak_rss(r"-m stages[. ]train") as lite0_memory:
            experiment(["check", "weights", "train"], "strategy=finetune", "model.backbone=efficientnet_lite0",
                       f"train.lr={params.train.lr:g}", "train.head_epochs=0", "train.epochs=1")
    finally:
        restore_workspace()
    index_small = index_speed(max(1, args.index_images // 5))
    index_large = index_speed(args.index_images)

    floor = passes / rates["eager"]
    network = finetune_time.get("data", 0) + finetune_time.get("compute", 0)
    rows = [
        ("backbone forward throughput", f"{rates['eager']:.1f} images/s eager (as the recipe runs it), "
         f"{rates['traced']:.1f} traced and frozen (as the features stage runs it)", "measured"),
        ("frozen: recipe loop", f"{recipe_frozen['wall']:.0f} s, best val {recipe_frozen['best_val_accuracy']:.4f} "
         "(picked on those same images)", ""),
        ("frozen: `dvc exp run -S strategy=frozen`",
         f"{frozen_wall:.1f} s, test accuracy {frozen_eval['accuracy']:.4f}",
         "accuracy >= 0.95"),
        ("frozen speed-up", f"**{recipe_frozen['wall'] / frozen_wall:.1f}x**", ">= 10x"),
        ("frozen: follow-up `-S train.lr=X`, three times",
         f"median **{statistics.median(follow_walls):.1f} s** ({', '.join(f'{w:.1f}' for w in follow_walls)} s for X = "
         f"{', '.join(f'{lr:g}' for lr in follow_lrs)}; ran {', '.join(follow_ran)}), test accuracy "
         f"{', '.join(f'{a:.4f}' for a in follow_accuracies)}", "< 15 s"),
        ("frozen vs the floor", f"{frozen_wall:.1f} s = **{frozen_wall / (floor + start_up):.2f}x** "
         f"({passes} backbone inputs / {rates['eager']:.1f} images/s = {floor:.1f} s, plus {start_up:.1f} s start-up)",
         "<= 2x"),
        ("finetune: recipe loop", f"{recipe_finetune['wall']:.0f} s, best val "
         f"{recipe_finetune['best_val_accuracy']:.4f} (picked on those same images), "
         f"{recipe_finetune['data_seconds']:.0f} s of it waiting for data", ""),
        ("finetune: `dvc exp run -S strategy=finetune`", f"{finetune_wall:.1f} s, test accuracy "
         f"{finetune_eval['accuracy']:.4f} (best epoch {finetune_eval['best_epoch']})", "accuracy >= 0.95"),
        ("finetune time ratio", f"**{finetune_wall / recipe_finetune['wall']:.2f}** of the recipe's time", "<= 0.33"),
        ("finetune: where the train stage's time went",
         f"head on features {finetune_time.get('head', 0):.1f} s; network epochs {network:.1f} s, of which waiting "
         f"for data {finetune_time.get('data', 0):.1f} s; validation {finetune_time.get('validate', 0):.1f} s; "
         f"stage total {finetune_time['total']:.1f} s", ""),
        ("finetune peak RSS", f"{finetune_memory['peak_mb']:.0f} MB ({backbone}, train stage and its workers)", ""),
        ("Lite0 finetune peak RSS", f"**{lite0_memory['peak_mb']:.0f} MB** (batch {params.train.batch_size}, "
         "train stage and its workers)", "< 3 GB"),
        ("index", f"**{index_large[0]:.0f} images/s** on {args.index_images} generated JPEGs, peak RSS "
         f"{index_large[1]:.0f} MB ({index_small[1]:.0f} MB at {max(1, args.index_images // 5)} images)",
         ">= 300 images/s, flat memory"),
    ]
    bf16 = ("AMX (train.amp auto trains in bf16)" if cpu_autocasts("auto")
            else "no AMX (train.amp auto trains in full precision)")
    table = "\n".join([
        f"Measured {date.today()} by `python -m bench.speed` on {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, {bf16}, "
        f"backbone `{backbone}`, hymenoptera "
        f"(recipe: {args.recipe_epochs} epochs, batch 4; ours: params.yaml):",
        "",
        "| what | measured | target |",
        "|---|---|---|",
        *[f"| {what} | {value} | {target} |" for what, value, target in rows],
    ])
    print(table)
    publish("speed", table, RESULTS)


if __name__ == "__main__":
    main()
