"""Training steps per second of the network phase under its speed levers, on random images.

    python -m bench.network_speed [--batch-size 8] [--steps 5]

For each backbone, input size and train.trainable_fraction of the table below, it times
`--steps` training steps (after two warm-up steps) as the network phase runs them: bf16 autocast
where train.amp auto uses it (CPUs with AMX), channels-last, AdamW over the trainable weights, BatchNorm
statistics fixed; the same steps with train.amp true (bf16 wherever the CPU has bf16
instructions, the rule before auto); and the forward pass alone, as validation runs it. Compute only: no decoding,
no loader. Writes bench/results/network_speed.md and README's `network-speed` block.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import date
from pathlib import Path

import torch

from bench.publish import cpu_name, publish
from stages.lib.backbones import create_backbone, resolve_backbone
from stages.lib.classifier import Classifier, make_head
from stages.lib.runtime import autocast, cpu_autocasts
from stages.lib.training import freeze_early_weights, keep_batchnorm_statistics

RESULTS = Path("bench/results/network_speed.md")
CONFIGS = [("efficientnet_lite2", 260, 1.0), ("efficientnet_lite2", 192, 1.0), ("efficientnet_lite2", 160, 1.0),
           ("efficientnet_lite2", 160, 0.95), ("efficientnet_lite2", 260, 0.75),
           ("efficientnet_lite2", 192, 0.75), ("efficientnet_lite2", 192, 0.5), ("efficientnet_lite0", 224, 1.0),
           ("efficientnet_lite0", 192, 0.75)]


def images_per_second(backbone_name: str, size: int, fraction: float, batch_size: int,
                      steps: int, amp: bool | str = "auto") -> tuple[float, float]:
    torch.manual_seed(0)
    backbone, width = create_backbone(resolve_backbone(backbone_name))
    model = Classifier(backbone, make_head(width, 8, "linear", 256, 0.2)).to(memory_format=torch.channels_last)
    if fraction < 1:
        freeze_early_weights(backbone, fraction)
    optimizer = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=1e-4)
    model.train()
    keep_batchnorm_statistics(backbone)
    images = torch.randn(batch_size, 3, size, size).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 8, (batch_size,))
    cpu = torch.device("cpu")
    for step in range(2 + steps):
        if step == 2:
            started = time.perf_counter()
        with autocast(cpu, amp):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train = batch_size * steps / (time.perf_counter() - started)
    model.eval()
    with torch.inference_mode():
        model(images)
        started = time.perf_counter()
        for _ in range(steps):
            model(images)
    return train, batch_size * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    lines = [f"Measured {date.today().isoformat()} on {cpu_name()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__} with {torch.get_num_threads()} threads, bf16 autocast "
             f"{'on' if cpu_autocasts('auto') else 'off (train.amp auto, no AMX)'}, batch {args.batch_size}, by "
             "`python -m bench.network_speed` (compute only, random images).", "",
             "| backbone | crops | train.trainable_fraction | training | training with train.amp true | "
             "forward only (validation) |",
             "|---|---|---|---|---|---|"]
    baseline = None
    for name, size, fraction in CONFIGS:
        train, forward = images_per_second(name, size, fraction, args.batch_size, args.steps)
        # train.amp true autocasts to bf16 wherever the CPU has bf16 instructions: the rule before auto.
        train_amp, _ = images_per_second(name, size, fraction, args.batch_size, args.steps, amp=True)
        baseline = baseline or train
        print(f"{name} {size} px, fraction {fraction}: {train:.1f} images/s training ({train_amp:.1f} with amp true), "
              f"{forward:.1f} forward", flush=True)
        lines.append(f"| {name} | {size} px | {fraction:g} | {train:.1f} images/s ({train / baseline:.1f}x) | "
                     f"{train_amp:.1f} images/s | {forward:.1f} images/s |")
    publish("network-speed", "\n".join(lines), RESULTS)


if __name__ == "__main__":
    main()
