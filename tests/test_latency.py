"""Stage `latency`: each engine of the shipped model timed on this machine."""

from __future__ import annotations

import hashlib
import json
import os

import pandas as pd
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
    assert set(speed) == {"threads", "input_size", "other_threads_running", "machine_busy", "model_md5"} | {
        f"{engine}_{what}" for engine in engines for what in ("latency_ms_median", "latency_ms_p90",
                                                              "images_per_s_batch32")}
    assert speed["other_threads_running"] >= 0 and isinstance(speed["machine_busy"], bool)
    assert speed["model_md5"] == hashlib.md5((root / "models/model.safetensors").read_bytes()).hexdigest()
    engines_csv = pd.read_csv(root / "metrics/latency/engines.csv")  # DVC's plot of it
    assert engines_csv.engine.tolist() == engines
    assert engines_csv.latency_ms_median.tolist() == [speed[f"{e}_latency_ms_median"] for e in engines]
    assert speed["threads"] >= 1 and speed["input_size"] == json.loads(
        (root / "models/export/model.json").read_text())["input_size"]
    for engine in engines:
        assert 0 < speed[f"{engine}_latency_ms_median"] <= speed[f"{engine}_latency_ms_p90"]
        assert speed[f"{engine}_images_per_s_batch32"] > 0
        assert f"{engine} " in caplog.text


@pytest.mark.slow  # the export stages, then latency
def test_a_measurement_on_a_busy_machine_is_flagged_not_published_as_the_models(trained_copy, caplog, monkeypatch):
    from stages.lib import latency as lib

    root = trained_copy
    set_params(root, int8=False)
    set_params(root, "latency", runs=3)
    export_backbone.main()
    export.main()
    cores = os.cpu_count()
    reads = iter([0.0, float(cores)])  # idle before, as many other threads as cores after
    monkeypatch.setattr(latency, "other_running_threads", lambda: next(reads))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with caplog.at_level("INFO"):
        latency.main()
    speed = json.loads((root / "metrics/latency.json").read_text())
    assert speed["threads"] == 1 and speed["machine_busy"] is True and speed["other_threads_running"] == cores
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == [f"metrics/latency.json: not the model's latency: {cores:g} other threads were running beside "
                    f"its 1 on {cores} cores; rerun on an idle machine (dvc repro -f latency)"], said
    assert "median, 1 threads from OMP_NUM_THREADS" in caplog.text
    # The kernel's count, read for real: this process's own reading thread is not counted
    assert lib.other_running_threads(reads=3, interval=0.0) >= 0
    assert not lib.busy(0.0, cores) and lib.busy(1.0, cores) and not lib.busy(None, 64)
