"""`reglue demo`, the README's quickstart, runs end to end (smaller than its defaults) and resumes."""

import json

import numpy as np

from reglue.demo import DemoConfig, run_demo
from reglue.pipeline.store import Cache


def test_demo_runs_every_stage_and_a_rerun_resumes(tmp_path, capsys):
    cfg = DemoConfig(out=str(tmp_path / "demo"), classes=2, per_class=5, steps=4, samples=4)
    result = run_demo(cfg)
    assert np.isfinite(result["metrics"]["metrics"]["fid"])
    with np.load(result["samples"]) as npz:
        assert npz["arr_0"].shape == (4, 64, 64, 3) and npz["arr_0"].dtype == np.uint8
    assert "zz_truncated.jpg" in capsys.readouterr().out  # the broken file is reported, not fatal
    # the README's flow: extract's defaults (no layers rows), the compressor trained on the images, then filled
    cache = Cache.open(result["cache"])
    assert cache.meta.layers_count == 0 and cache.has("compressed") and cache.meta.compressor["stage"] == "fill"
    report = json.loads((tmp_path / "demo" / "compressor" / "compressor.json").read_text())
    assert report["config"]["src"].endswith("images") and report["skipped"][0]["path"].endswith("zz_truncated.jpg")

    again = run_demo(cfg)  # every stage finds its outputs: nothing is retrained or resampled
    assert again["metrics"]["metrics"]["fid"] == result["metrics"]["metrics"]["fid"]
    out = capsys.readouterr().out
    assert "already done:" in out  # the finished run is not trained again
    assert out.strip().splitlines()[-1].startswith(f"demo: run {tmp_path / 'demo' / 'run'}, samples ")  # its ending
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["snapshot"].endswith("ema-0000004.safetensors")
