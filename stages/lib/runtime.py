"""Where and how tensors run: the device, mixed precision, memory format, several processes, signals."""

from __future__ import annotations

import os
import signal
from contextlib import nullcontext
from functools import cache
from pathlib import Path

import torch


def pick_device() -> torch.device:
    """CUDA (under torchrun, the GPU of this process's LOCAL_RANK), then MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@cache
def cpu_flags() -> frozenset[str]:
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def cpu_autocasts(amp: bool | str) -> bool:
    """Whether train.amp trains in bf16 on this CPU. true: wherever the CPU has bf16 instructions
    (AVX512-BF16 or AMX; without them bf16 is emulated and slow). auto: only with AMX, whose tile
    units multiply bf16 matrices natively. With AVX512-BF16 alone, bf16 autocast trained
    EfficientNet-Lite2 slower than full precision (24.9 against 35.5 images/s at 160 px, 11.2 against
    13.1 at 260 px: bench.network_speed on a 2-core AMD EPYC, 2026-11-26): its depthwise
    convolutions gain nothing and pay for the conversions."""
    if amp is False:
        return False
    return bool(cpu_flags() & ({"amx_bf16"} if amp == "auto" else {"avx512_bf16", "amx_bf16"}))


def autocast(device: torch.device, amp: bool | str):
    """Mixed precision for training steps: on CUDA (amp true or auto) bf16 where supported, else
    fp16 (with a GradScaler); on CPUs as `cpu_autocasts` says; full precision elsewhere. Inference
    never autocasts (see inference.py)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    if device.type == "cpu" and cpu_autocasts(amp):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def grad_scaler(device: torch.device, amp: bool | str) -> torch.amp.GradScaler:
    """Loss scaling, needed only for fp16 (CUDA without bf16); a disabled scaler elsewhere."""
    fp16 = amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler(device.type, enabled=fp16)


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    format_ = torch.channels_last if channels_last and images.ndim == 4 else torch.contiguous_format
    return images.to(device, non_blocking=True, memory_format=format_)


def start_distributed() -> tuple[int, int]:
    """(rank, world size): under torchrun (WORLD_SIZE > 1) join the process group, NCCL on GPUs,
    gloo on CPUs; else (0, 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), world_size


def stop_distributed(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.destroy_process_group()


def sum_over_processes(*values: float) -> list[float]:
    """Each value summed over every process (itself alone when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(values)
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)
    return totals.tolist()


def stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so both stop the same clean way."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)
