"""FID-Nk during `reglue train`: logged at its steps, finite, and without any effect on the trained
weights. The tiny cache of test_train_loop.py, a random-weight Inception stand-in, CPU, fp32."""

import json
import math
from pathlib import Path

import pytest
import test_train_loop
import torch
from safetensors.torch import load_file
from test_train_loop import cli_train, config, log, losses
from typer.testing import CliRunner

from reglue.cli import app
from reglue.trainer.evaluate import RefConfig, reference_stats
from reglue.trainer.inception import INCEPTION_FILE
from reglue.trainer.loop import train
from reglue.trainer.runfolder import RUN_CONTROL
from reglue.weights import WeightsUnavailable

caches = test_train_loop.caches  # the tiny cache fixture (tiny preset, 64 px, 32 images)
STEPS = 5


@pytest.fixture(scope="module")
def fid_files(caches, tmp_path_factory, standin_inception):
    """The stand-in Inception and reference statistics of 8 of the cache's source images."""
    root = tmp_path_factory.mktemp("fid")
    inception = standin_inception
    images = Path(caches["bare"]).parent / "images"
    ref = reference_stats(RefConfig(str(images), str(root / "ref.npz"), resolution=64, num=8,
                                    inception=str(inception), batch_size=8, cpu=True))
    return {"fid_ref": str(ref), "inception": str(inception)}


def fid_config(caches, out, fid_files, **kw):
    # method reg: the sampler also carries the CLS state; 4 samples of 2 SDE steps keep it fast
    return config(caches["bare"], out, method="reg", max_steps=STEPS, ckpt_every=STEPS, snapshot_every=STEPS,
                  fid_num=4, fid_steps=2, fid_batch=2, **fid_files, **kw)


def test_fid_is_logged_and_leaves_training_unchanged(caches, fid_files, tmp_path):
    train(fid_config(caches, tmp_path / "fid", fid_files, fid_every=2))
    train(fid_config(caches, tmp_path / "plain", fid_files, fid_every=0))
    fids = [line for line in log(tmp_path / "fid") if "fid" in line]
    assert [line["step"] for line in fids] == [2, 4, STEPS]  # every 2 steps and at the end
    assert all(math.isfinite(line["fid"]) and line["fid"] > 0 and line["fid_num"] == 4 for line in fids)
    assert [line for line in losses(tmp_path / "fid") if "fid" not in line] == losses(tmp_path / "plain")
    a, b = (tmp_path / run / "checkpoints" / f"step-{STEPS:07d}" for run in ("fid", "plain"))
    model_a, model_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert model_a.keys() == model_b.keys() and all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    ema_a, ema_b = torch.load(a / "ema.pt")["ema"], torch.load(b / "ema.pt")["ema"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert {"fid_every", "fid_num", "fid_ref", "inception"} <= set(RUN_CONTROL)  # so FID can be turned on later


def test_fid_inputs_fail_early(caches, fid_files, tmp_path, monkeypatch):
    monkeypatch.delenv("REGLUE_FID_REF", raising=False)
    # no fid_ref: the ADM batch for the cache's resolution, and a 64 px, 4-class cache has none
    with pytest.raises(ValueError, match="no reference batch for a model of 4 classes.*reglue fid-ref"):
        train(fid_config(caches, tmp_path / "run", {**fid_files, "fid_ref": None}, fid_every=2))
    missing = {**fid_files, "inception": str(tmp_path / "nowhere" / INCEPTION_FILE)}
    with pytest.raises(WeightsUnavailable, match="REGLUE_INCEPTION_WEIGHTS"):
        train(fid_config(caches, tmp_path / "run", missing, fid_every=2))
    assert not (tmp_path / "run" / "log.jsonl").exists()  # nothing trained
    with pytest.raises(FileNotFoundError, match="fid-ref"):
        train(fid_config(caches, tmp_path / "run", {**fid_files, "fid_ref": str(tmp_path / "no.npz")}, fid_every=2))


def test_cli_fid_options(caches, fid_files, tmp_path):
    args = cli_train(caches["bare"], tmp_path, "--method", "reg", "--dry-run")[3:]
    result = CliRunner().invoke(app, [*args, "--fid-every", "500", "--fid-num", "5000",
                                      "--fid-ref", fid_files["fid_ref"], "--inception", fid_files["inception"]])
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.stdout)["config"]
    assert (resolved["fid_every"], resolved["fid_num"]) == (500, 5000)
    assert (resolved["fid_ref"], resolved["inception"]) == (fid_files["fid_ref"], fid_files["inception"])
    result = CliRunner().invoke(app, [*args, "--fid-every", "500"])  # the reference is found when training starts
    assert result.exit_code == 0 and json.loads(result.stdout)["config"]["fid_ref"] is None
