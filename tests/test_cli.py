"""The command line as a user meets it: every config field an option, choices checked in one line, configs
in and out (`train --config`), offline errors within seconds that name the option, `reglue download`."""

import dataclasses
import json
import time

import huggingface_hub.constants
import numpy as np
import pytest
import test_train_loop
import yaml
from PIL import Image
from typer.testing import CliRunner

from reglue import weights
from reglue.cli import app
from reglue.trainer.generate import GenerateConfig
from reglue.trainer.loop import TrainConfig
from reglue.trainer.sampling import SamplerConfig

caches = test_train_loop.caches  # the tiny cache fixture (tiny preset, 64 px, 32 images)


def invoke(*args, **kw):
    return CliRunner().invoke(app, [str(a) for a in args], **kw)


def test_help_version_and_every_field_is_an_option():
    top = invoke("--help").output
    order = [top.index(f"\n  {name} ") for name in ("extract", "train", "sample", "fid", "download", "demo")]
    assert order == sorted(order) and "reglue train --cache cache/" in top  # pipeline order, one example
    assert invoke("--version").output.strip() == "reglue 0.1.0"
    for command, classes in {"train": [TrainConfig], "sample": [GenerateConfig, SamplerConfig]}.items():
        text = invoke(command, "--help", terminal_width=200).output
        assert "Example: reglue " + command in " ".join(text.split())
        for f in (f for cls in classes for f in dataclasses.fields(cls)):
            if f.name not in ("checkpoint", "sampler", "vae_preset", "path"):  # path: from the checkpoint
                assert f"--{f.name.replace('_', '-')}" in text, (command, f.name)
    sample = invoke("sample", "--help", terminal_width=200).output
    assert "--weights <real|tiny>" in sample and "-n, --num" in sample and "--mode <sde|ode>" in sample


@pytest.mark.parametrize("args, bad", [(["sample", "x.pt", "--mode", "odee"], "odee"),
                                       (["sample", "x.pt", "--precision", "fp16"], "fp16"),
                                       (["models", "--method", "sitt"], "sitt"),
                                       (["train", "--cache", "c", "--model", "SiT-Q/2"], "SiT-Q/2")])
def test_a_bad_choice_is_one_line_listing_the_choices(args, bad):
    result = invoke(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"'{bad}' is not one of" in result.output


def test_train_config_file_in_and_flags_over_it(caches, tmp_path):
    args = ["train", "--cache", caches["bare"], "--method", "reg", "--model", "SiT-tiny/2", "--precision", "fp32",
            "--dry-run"]
    first = invoke(*args, "--sample-steps", 7, "--betas", 0.8, 0.95, "--trackers", "")
    assert first.exit_code == 0, first.output
    (tmp_path / "run.json").write_text(first.stdout)  # the dry-run's output is a config file as it stands
    again = invoke("train", "--config", tmp_path / "run.json", "--dry-run")
    assert json.loads(again.stdout)["config"] == json.loads(first.stdout)["config"]
    over = json.loads(invoke("train", "--config", tmp_path / "run.json", "--lr", 0.5, "--dry-run").stdout)["config"]
    assert over["lr"] == 0.5 and over["sample_steps"] == 7 and over["betas"] == [0.8, 0.95] and over["trackers"] == []
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"cache": caches["bare"], "method": "reg", "model": "SiT-tiny/2",
                                                      "precision": "fp32", "ema_decay": 0.99, "fid_steps": 9,
                                                      "tf32": False}))
    cfg = json.loads(invoke("train", "--config", tmp_path / "run.yaml", "--dry-run").stdout)["config"]
    assert (cfg["ema_decay"], cfg["fid_steps"], cfg["tf32"], cfg["out"]) == (0.99, 9, False, "runs/reg-SiT-tiny-2-bare")
    (tmp_path / "bad.yaml").write_text("cache: c\nema: 0.99\n")
    result = invoke("train", "--config", tmp_path / "bad.yaml")
    assert result.exit_code == 1 and "unknown TrainConfig fields ['ema']" in result.output
    assert result.output.count("\n") == 1


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """No network: an empty Hugging Face cache and a hub endpoint nobody listens on (a closed local port), with
    HF_HUB_OFFLINE unset: what is tested is that no download is attempted, so no ~35 s of hub retries."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv(weights.DINOV2_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    from diffusers import AutoencoderKL  # noqa: F401  (imported before the clock starts: it times waiting, not imports)


def test_offline_errors_come_within_seconds_and_name_the_option(unreachable_hub, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(images / f"{i}.png")
    t0 = time.perf_counter()
    result = invoke("extract", images, "--out", tmp_path / "c.zarr", "--vae", "stabilityai/sd-vae-ft-ema", "--cpu")
    assert time.perf_counter() - t0 < 10 and result.exit_code == 1
    line, = result.output.splitlines()  # one line
    for part in ["'stabilityai/sd-vae-ft-ema'", "--vae DIR", "HF_HUB_OFFLINE=1", "cannot be reached",
                 "reglue download"]:
        assert part in line
    assert "ft-mse" not in line and "config.json." not in line  # not diffusers' misleading text
    weights.tiny_vae().save_pretrained(tmp_path / "vae")  # a local VAE copy: now DINOv2 is the missing one
    t0 = time.perf_counter()
    result = invoke("extract", images, "--out", tmp_path / "c.zarr", "--vae", tmp_path / "vae", "--cpu")
    assert time.perf_counter() - t0 < 10 and result.exit_code == 1
    assert "--encoder-weights FILE" in result.output and "HF_HUB_OFFLINE=1" in result.output


def test_a_vae_of_another_architecture_is_refused(tmp_path):
    flat = weights.build_vae(down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                             block_out_channels=(8,), layers_per_block=1, norm_num_groups=4)  # no downsampling
    flat.save_pretrained(tmp_path / "flat")
    with pytest.raises(ValueError, match="downsamples by 1, not an AutoencoderKL that downsamples by 8"):
        weights.load_vae(str(tmp_path / "flat"))


def test_download_lists_everything_and_fails_fast_offline(monkeypatch, tmp_path):
    result = invoke("download", "--to", tmp_path / "w", "--resolution", 256, "--resolution", 512, "--dry-run")
    assert result.exit_code == 0, result.output
    *files, env = result.output.strip().splitlines()
    assert len(files) == 6 and any("VIRTUAL_imagenet512.npz" in f for f in files)
    for name in ["stabilityai/sd-vae-ft-mse", "stabilityai/sd-vae-ft-ema", "timm/vit_base_patch14_reg4_dinov2",
                 "inception-2015-12-05.pt", "ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz"]:
        assert any(name in f for f in files), name
    assert env.startswith("export HF_HOME=") and "HF_HUB_OFFLINE=1" in env and "REGLUE_FID_REF=" in env
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    result = invoke("download", "--to", tmp_path / "w")
    assert result.exit_code == 1 and time.perf_counter() - t0 < 10
    assert result.output.count("\n") == 1 and "HF_HUB_OFFLINE is set" in result.output
    assert not (tmp_path / "w").exists()  # nothing half-made
