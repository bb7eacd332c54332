"""INT8 for the exported model: ONNX Runtime's static post-training quantisation, calibrated on
training images, and the test that decides whether it ships.

QDQ format, weights int8 per output channel: in EfficientNet-Lite2's export (BatchNorm folded
in), a depthwise convolution's widest channel spans a median 6x (up to 25x) the range of its
median channel, so one scale per tensor would leave most channels a few bits;
activations uint8 from the calibration images' min-max ranges. Only the backbone is
quantised: the export stage joins the INT8 backbone with the head in float (a few thousand
multiply-adds, the temperature and the softmax; quantised, the probabilities would come in steps
of 1/255 and no longer sum to one), and scores the test split on the INT8 backbone's cached
outputs, which a new head leaves valid. Where the CPU lacks VNNI, 8-bit
weights times 8-bit activations can overflow the 16-bit intermediate sums of the AVX2 kernels:
ONNX Runtime's advice there is 7-bit weights (`reduce_range`), which this follows. The INT8
model is then scored on the test split beside the fp32 one, and shipped only if its accuracy is
within export.int8_tolerance of fp32's.
"""

from __future__ import annotations

import logging
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnx

CALIBRATION_BATCH = 8


def has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI); other CPUs need no reduced range."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False  # unknown: the safe choice is the reduced range
    return "avx512_vnni" in flags or "avx_vnni" in flags


def prepared_for_quantisation(model: Path, target: Path) -> None:
    """What ONNX Runtime's quant_pre_process does, less its symbolic shape inference: the graph
    folded by ORT's basic optimisations (constants, the padding's shape arithmetic), then shapes
    inferred. Not the helper itself: it imports onnxruntime.tools, which imports torch wherever
    torch is installed, and the export stage stays torch-free."""
    import onnxruntime
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    prepared = onnx.shape_inference.infer_shapes(onnx.load(str(target)))
    add_pre_process_metadata(prepared)  # marks it pre-processed, which it now is
    onnx.save(prepared, str(target))


def quantize_int8(model: Path, target: Path, input_name: str, images: np.ndarray) -> None:
    """A backbone's ONNX file (fp32) -> `target` (INT8, QDQ), activation ranges from `images`
    (prepared, N x 3 x H x W)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(images, max(1, len(images) // CALIBRATION_BATCH)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        prepared_for_quantisation(model, prepared)
        # The quantiser logs a line on the root logger for every bias whose scale it adjusts (dozens
        # per model): routine, and not for the stage's log.
        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.WARNING))
        try:
            quantize_static(str(prepared), str(target), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=not has_vnni(), activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)


def int8_verdict(fp32_accuracy: float, int8_accuracy: float, tolerance: float) -> tuple[bool, str]:
    """Whether INT8 ships, and the one line that says why."""
    drop = fp32_accuracy - int8_accuracy
    if drop <= tolerance + 1e-12:
        return True, (f"INT8 shipped: test accuracy {int8_accuracy:.4f} against fp32's {fp32_accuracy:.4f} "
                      f"(within export.int8_tolerance {tolerance:g})")
    return False, (f"INT8 not shipped: its test accuracy {int8_accuracy:.4f} is {drop:.4f} below fp32's "
                   f"{fp32_accuracy:.4f}, more than export.int8_tolerance {tolerance:g}; fp32 only")
