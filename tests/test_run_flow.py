"""The promised commands as written: `reglue train --cache CACHE` (a default run folder that a rerun
resumes, trackers with config, grids and lr, the line it ends on, `--init-from`), `reglue fid CKPT` with no
--ref, `reglue sample` from a Hugging Face id or hf:// path, and its grid of the first N samples."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import test_train_loop
import torch
import yaml
from PIL import Image
from test_sampling_generate import KWARGS, tiny_checkpoint, tiny_sit  # noqa: F401  (fixture)
from typer.testing import CliRunner

from reglue.cli import app
from reglue.pipeline.store import Cache
from reglue.trainer.checkpoints import load_model, save_snapshot
from reglue.trainer.inception import INCEPTION_ENV
from reglue.trainer.loop import TrainConfig, init_weights, make_plan
from reglue.trainer.models import SiT, preset_kwargs
from reglue.trainer.objective import get_method

caches = test_train_loop.caches  # the tiny cache fixture (tiny preset, 64 px, 32 images)
SMALL = ["--model", "SiT-tiny/2", "--global-batch", "8", "--precision", "fp32", "--cpu", "--log-every", "1"]


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def test_train_with_only_the_cache_makes_resumes_and_reports_its_run(caches, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["train", "--cache", caches["full"], *SMALL, "--sample-every", 2, "--sample-steps", 2]
    args = [*base, "--max-steps", 2]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    run = Path("runs/reglue-SiT-tiny-2-full")  # <method>-<model>-<cache name>, printed at start
    assert result.stdout.startswith(f"run folder: {run}\n")
    last = result.stdout.strip().splitlines()[-1]
    for part in [f"trained {run} to step 2", "checkpoint runs/reglue-SiT-tiny-2-full/checkpoints/step-0000002",
                 "EMA snapshot runs/reglue-SiT-tiny-2-full/snapshots/ema-0000002.safetensors", "grids", "TensorBoard"]:
        assert part in last
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [line["lr"] for line in lines] == [1e-4, 1e-4] and all(line["time"] > 1.7e9 for line in lines)

    # TensorBoard holds the grid as an image and the resolved config as hyperparameters (+ hparams.yml).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    grid = events.Images("samples/grid")[0]
    assert grid.step == 2 and (grid.width, grid.height) == (4 * 64, 4 * 64)
    assert {"train/loss", "train/lr", "train/img_per_s"} <= set(events.Tags()["scalars"])
    hparams = yaml.safe_load(next((run / "tensorboard").glob("*/hparams.yml")).read_text())
    assert hparams["config/method"] == "reglue" and hparams["model_kwargs/input_size"] == 8

    again = invoke(*args)  # the same command: nothing to do, and it says so
    assert "already done: runs/reglue-SiT-tiny-2-full is at step 2 of 2" in again.stdout.strip().splitlines()[-1]
    more = invoke(*base, "--max-steps", 3)  # a longer run resumes in the same folder
    assert "resumed from runs/reglue-SiT-tiny-2-full/checkpoints/step-0000002 at step 2" in more.output
    assert (run / "checkpoints" / "step-0000003").exists()
    for method, folder in [("repa", "runs/repa-SiT-tiny-2-full"), ("reglue", "elsewhere")]:
        extra = ["--out", "elsewhere"] if folder == "elsewhere" else []
        dry = invoke("train", "--cache", caches["full"], *SMALL, "--method", method, *extra, "--dry-run")
        assert json.loads(dry.stdout)["config"]["out"] == folder

    # --init-from: a new run whose model starts from the snapshot; another model is refused in one line.
    snapshot = run / "snapshots" / "ema-0000002.safetensors"
    cfg = TrainConfig(caches["full"], model="SiT-tiny/2", init_from=str(snapshot))
    assert cfg.out == "runs/reglue-SiT-tiny-2-full-from-ema-0000002"
    plan = make_plan(cfg, Cache.open(cfg.cache), 1)
    model = SiT(**plan.model_kwargs)
    assert "initialized from" in init_weights(model, str(snapshot), plan)
    ema, _ = load_model(snapshot)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ema.state_dict().values()))
    refused = invoke("train", "--cache", caches["full"], *SMALL, "--method", "repa", "--init-from", snapshot,
                     "--max-steps", 1)
    assert refused.exit_code == 1 and "holds another model than this run builds" in refused.output


def small_reference(path: Path) -> Path:
    """Reference statistics with the keys `reglue fid` reads (mu, sigma): enough to score against."""
    np.savez(path, mu=np.zeros(2048), sigma=np.eye(2048))
    return path


def test_fid_without_ref_finds_the_reference_or_says_how(tiny_checkpoint, tmp_path, monkeypatch,  # noqa: F811
                                                         standin_inception):
    monkeypatch.setenv("REGLUE_FID_REF", str(small_reference(tmp_path / "ref.npz")))
    monkeypatch.setenv(INCEPTION_ENV, str(standin_inception))
    result = invoke("fid", tiny_checkpoint, "-n", 2, "--num-steps", 2, "--weights", "tiny", "--cpu")
    assert result.exit_code == 0, result.output
    assert "FID-2 " in result.output and "ref=ref.npz" in result.output and ".metrics.json" in result.output

    # Offline, with nothing supplied: one line naming the ADM file for the checkpoint's resolution, its source
    # and the two ways to supply it (a 256 px, 1000-class checkpoint; the 64 px one has no ADM batch at all).
    monkeypatch.delenv("REGLUE_FID_REF")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    torch.manual_seed(0)
    imagenet = tmp_path / "imagenet256.safetensors"
    kwargs = {**KWARGS, "input_size": 32, "num_classes": 1000}
    save_snapshot(imagenet, SiT(**preset_kwargs("SiT-tiny/2"), **kwargs), model_kwargs={**preset_kwargs("SiT-tiny/2"),
                  **kwargs}, method=get_method("reglue", feature_channels=4), step=1,
                  meta=dict(latent_channels=4, resolution=256, vae_scaling_factor=0.18215))
    t0 = time.perf_counter()
    result = invoke("fid", imagenet, "--weights", "tiny", "--cpu")
    assert result.exit_code == 1 and time.perf_counter() - t0 < 10
    line, = result.output.splitlines()
    for part in ["VIRTUAL_imagenet256_labeled.npz", "openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches",
                 "--ref FILE", "REGLUE_FID_REF", "HF_HUB_OFFLINE is set"]:
        assert part in line
    assert not list(tmp_path.glob("imagenet256-*.npz"))  # refused before sampling 50K images
    result = invoke("fid", tiny_checkpoint, "--weights", "tiny", "--cpu")
    assert result.exit_code == 1 and "no reference batch for a model of 10 classes" in result.output
    assert "reglue fid-ref" in result.output and result.output.count("\n") == 1


def test_sample_grid_is_the_first_n_samples_across_parts(tiny_checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "s.npz"
    result = invoke("sample", tiny_checkpoint, "-n", 16, "--out", out, "--batch-size", 8, "--part-size", 8,
                    "--grid", 16, "--num-steps", 2, "--weights", "tiny", "--cpu")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == f"samples: {out} (16 images), grid {tmp_path / 's.grid.png'}"
    grid = np.asarray(Image.open(tmp_path / "s.grid.png"))
    with np.load(out) as z:
        images = z["arr_0"]
    assert grid.shape == (4 * 64, 4 * 64, 3)  # 16 tiles in 4 x 4, no empty cell
    tiles = grid.reshape(4, 64, 4, 64, 3).transpose(0, 2, 1, 3, 4).reshape(16, 64, 64, 3)
    np.testing.assert_array_equal(tiles, images)


def hub_cache(root: Path, repo: str, files: dict[str, Path]) -> Path:
    """A Hugging Face cache holding `files` of `repo` at one commit, as `hf download` leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    for name, src in files.items():
        (folder / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / "snapshots" / commit / name)
    return root


def test_sample_from_a_hugging_face_id_or_hf_path(tiny_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE",
                        str(hub_cache(tmp_path / "hub", "acme/reglue-tiny", {"ema.safetensors": tiny_checkpoint})))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    fast = ["-n", 2, "--batch-size", 2, "--num-steps", 2, "--weights", "tiny", "--cpu", "--grid", 0]
    for source, name in [("hf://acme/reglue-tiny/ema.safetensors", "acme-reglue-tiny-ema"),
                         ("acme/reglue-tiny", "acme-reglue-tiny")]:
        result = invoke("sample", source, *fast)
        assert result.exit_code == 0, result.output
        # in the working folder, not the cache (with the hash of the non-default --weights tiny)
        [npz] = tmp_path.glob(f"{name}-sde2-cfg2.3-seed0-2*.npz")
        with np.load(npz) as z:
            assert z["arr_0"].shape == (2, 64, 64, 3)
    t0 = time.perf_counter()
    result = invoke("sample", "hf://acme/reglue-tiny/ema-0400000.pt", *fast)
    assert result.exit_code == 1 and time.perf_counter() - t0 < 10
    assert result.output.count("\n") == 1 and "hf://acme/reglue-tiny/ema-0400000.pt" in result.output
    assert "hf download acme/reglue-tiny ema-0400000.pt" in result.output and "HF_HUB_OFFLINE is set" in result.output
