"""Stage `latency`: each engine of the shipped model timed on this machine."""

from __future__ import annotations

import json

import pytest

from stages import export, export_backbone, latency
from tests.test_export import set_params


@pytest.mark.parametrize("int8", [True, False])
def test_every_shipped_engine_is_timed(trained_copy, caplog, int8):
    root = trained_copy
    set_params(root, int8=int8, int8_tolerance=1.0)  # INT8 shipped whenever it is made
    set_params(root, "latency", runs=5)
    export_backbone.main()
    export.main()
    with caplog.at_level("INFO"):
        latency.main()
    speed = json.loads((root / "metrics/latency.json").read_text())
    engines = ["torch_fp32", "onnx_fp32"] + (["onnx_int8"] if int8 else [])
    assert set(speed) == {"threads", "input_size"} | {f"{engine}_{what}" for engine in engines for what in (
        "latency_ms_median", "latency_ms_p90", "images_per_s_batch32")}
    assert speed["threads"] >= 1 and speed["input_size"] == json.loads(
        (root / "models/export/model.json").read_text())["input_size"]
    for engine in engines:
        assert 0 < speed[f"{engine}_latency_ms_median"] <= speed[f"{engine}_latency_ms_p90"]
        assert speed[f"{engine}_images_per_s_batch32"] > 0
        assert f"{engine} " in caplog.text
