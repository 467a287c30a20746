"""`reglue train-compressor` and `reglue train` end to end on a tiny real cache (tiny preset encoders,
64 px, 32 images with layers for all), CPU and fp32."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from images import write_class_images
from killing import sigkill_when_exists, wait_until_exists
from safetensors.torch import load_file
from typer.testing import CliRunner

from reglue.cli import app
from reglue.pipeline.compressor import compress, load_compressor, load_norm_stats
from reglue.pipeline.encoders import EncoderSpec, FeatureEncoder
from reglue.pipeline.extract import ExtractConfig, extract
from reglue.pipeline.sources import load_image
from reglue.pipeline.store import Cache, decode_patches
from reglue.trainer.checkpoints import load_model
from reglue.trainer.compressor_data import stored_norm_stats, valid_layer_rows
from reglue.trainer.compressor_train import CompressorConfig, train_compressor
from reglue.trainer.data import CacheLoader, epoch_order, flip_draws, layers_for, prepare_batch, required_arrays
from reglue.trainer.loop import PAUSE_ENV, TrainConfig, train, xl_lam_warning
from reglue.trainer.objective import get_method
from reglue.trainer.pca import fit_pca, pca_from_moments
from reglue.trainer.recipes import get_recipe
from reglue.trainer.runfolder import check_same_run

N, CHUNK, BATCH = 32, 8, 8
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def caches(tmp_path_factory):
    """`bare`: straight from extract (with the mirrored views, --flip); `full`: plus a compressor (2 epochs of 3
    steps) and its compressed features."""
    root = tmp_path_factory.mktemp("train")
    write_class_images(root / "images", N, classes=4)
    bare = str(root / "bare.zarr")
    extract(ExtractConfig(str(root / "images"), bare, EncoderSpec(preset="tiny", resolution=64),
                          layers_limit=N, chunk_size=CHUNK, batch_size=CHUNK, num_workers=0, flip=True))
    full = str(root / "full.zarr")
    shutil.copytree(bare, full)
    train_compressor(CompressorConfig(str(root / "compressor"), cache=full, epochs=2, steps_per_epoch=3, fill=full))
    return {"bare": bare, "full": full, "compressor": root / "compressor", "images": root / "images"}


def config(cache, out, **kw):
    base = dict(model="SiT-tiny/2", global_batch=BATCH, precision="fp32", max_steps=3, log_every=1, ckpt_every=3,
                snapshot_every=3, sample_every=0, trackers=())
    return TrainConfig(cache, str(out), **{**base, **kw})


def log(run):
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


def losses(run):
    return [{k: v for k, v in line.items() if k not in ("img_per_s", "time")} for line in log(run)]


def cli_train(cache, out, *extra, env=ENV):
    return [sys.executable, "-m", "reglue.cli", "train", "--cache", cache, "--out", str(out), "--model", "SiT-tiny/2",
            "--global-batch", str(BATCH), "--precision", "fp32", "--log-every", "1", "--ckpt-every", "3",
            "--sample-every", "0", "--trackers", "", *extra]


# ---- train-compressor ---------------------------------------------------------------------------

def test_streamed_norm_stats_equal_numpy(caches, tmp_path):
    cache = Cache.open(caches["bare"])
    mean, std = stored_norm_stats(cache, valid_layer_rows(cache), block_rows=3)
    x = cache.read("layers").astype(np.float64).reshape(-1, cache.array("layers").shape[-1])
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(std, x.std(0), rtol=1e-12)  # population std, as calc_norm_stats.py:76-79
    saved = load_norm_stats(caches["compressor"] / "dino_mean_std_8_9_10_11_64.pth")  # official name and format
    assert torch.equal(saved.std, torch.from_numpy(std).float())
    # the layers row of a sample that did not decode holds zeros: neither the stats nor the loader use it
    url = str(tmp_path / "skipped.zarr")
    shutil.copytree(caches["bare"], url)
    zarr.open_group(url, mode="r+")["valid"][5] = False  # every sample has a layers row here: row 5
    assert 5 not in valid_layer_rows(Cache.open(url))
    skipped = Cache.open(url)
    mean, std = stored_norm_stats(skipped, valid_layer_rows(skipped), block_rows=3)
    x = np.delete(cache.read("layers"), 5, axis=0).astype(np.float64).reshape(-1, x.shape[-1])
    np.testing.assert_allclose(std, x.std(0), rtol=1e-12)


def test_compressor_files_and_filled_features(caches):
    cache = Cache.open(caches["full"])
    encoder = load_compressor(caches["compressor"] / "compression_model.pth").encoder
    assert encoder.model[0].in_channels == 4 * cache.meta.dino_dim and cache.meta.compressed_channels == 16
    report = json.loads((caches["compressor"] / "compressor.json").read_text())
    assert len(report["epoch_mse"]) == 2 and report["plan"]["global_batch"] == N  # 4096 capped by the rows stored
    # an epoch is steps_per_epoch steps, not one pass over the 32 rows (that would be 1 step)
    assert report["steps"] == 6 and report["passes"] == 6.0
    stats = load_norm_stats(caches["compressor"] / "dino_mean_std_8_9_10_11_64.pth")
    with torch.no_grad():
        want = compress(encoder, torch.from_numpy(cache.read("layers", 0, 4)), stats)
    got = torch.from_numpy(cache.read("compressed", 0, 4)).float()
    assert torch.allclose(got, want, rtol=2e-3, atol=2e-3)  # stored as float16


def test_compressor_needs_layers_rows(caches, tmp_path):
    cache = str(tmp_path / "nolayers.zarr")
    shutil.copytree(caches["bare"], cache)
    meta = zarr.open_group(cache, mode="r+").attrs["reglue"]
    zarr.open_group(cache, mode="r+").attrs["reglue"] = {**meta, "layers_count": 0}
    with pytest.raises(ValueError, match="no layers rows: train from the images with `reglue train-compressor --src"):
        train_compressor(CompressorConfig(str(tmp_path / "c"), cache=cache))
    with pytest.raises(ValueError, match="steps_per_epoch must be positive"):
        CompressorConfig(str(tmp_path / "c"), cache=cache, steps_per_epoch=0)


# ---- the batch ----------------------------------------------------------------------------------

def test_prepare_batch_samples_upsamples_and_decodes(caches):
    cache = Cache.open(caches["full"])
    method = get_method("reglue")
    raw = next(CacheLoader(cache, required_arrays(method, cache), BATCH))
    torch.manual_seed(0)
    batch = prepare_batch(raw, method, cache.meta, torch.device("cpu"))
    m = cache.meta
    assert batch.latent.shape == (BATCH, m.latent_channels, m.latent_size, m.latent_size)
    assert batch.features.shape == (BATCH, 16, m.latent_size, m.latent_size)  # 4x4 grid -> 8x8 latent
    assert batch.repa_target.shape == (BATCH, 1 + m.num_patches, m.dino_dim)
    assert torch.equal(batch.repa_target[:, 0], batch.cls)
    mean, std = raw["vae_moments"].float().chunk(2, dim=1)
    torch.manual_seed(0)
    assert torch.allclose(batch.latent, (mean + std * torch.randn_like(mean)) * 0.18215)
    up = torch.nn.functional.interpolate(raw["compressed"].float(), size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.equal(batch.features, up)


# ---- train: the five methods --------------------------------------------------------------------

@pytest.mark.parametrize("method", ["sit", "repa", "reg", "redi", "reglue"])
def test_each_method_trains(caches, tmp_path, method):
    extra = dict(trackers=("tensorboard",), sample_every=3, sample_steps=2) if method == "reglue" else {}
    train(config(caches["full"], tmp_path, method=method, **extra))
    m = get_method(method)
    lines = log(tmp_path)
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all(math.isfinite(line["loss"]) for line in lines)
    assert all((line["feature"] != 0) == (m.features != "none") and (line["cls"] != 0) == m.cls
               and (line["proj"] != 0) == m.repa for line in lines)
    model, info = load_model(tmp_path / "snapshots" / "ema-0000003.safetensors")
    assert info.method.name == method and model.in_channels == 4 + m.feature_channels
    assert info.method.vae_cfg_rule == ("redi" if method == "redi" else "reglue")  # how `sample --vae-cfg` guides it
    assert json.loads((tmp_path / "config.json").read_text())["model_kwargs"]["input_size"] == 8  # from the cache
    assert (tmp_path / "checkpoints" / "step-0000003" / "ema.pt").exists()
    if method == "sit":  # on resume the recipe fields compare as resolved: an explicit --flip is sit's default
        check_same_run(tmp_path, config(caches["full"], tmp_path, method=method, flip=True), get_recipe("sit"))
        with pytest.raises(ValueError, match="flip: True there, False now"):
            no_flip = config(caches["full"], tmp_path, method=method, flip=False)
            check_same_run(tmp_path, no_flip, get_recipe("sit").override(flip=False))
    if method == "redi":
        assert load_file(tmp_path / "pca.safetensors")["components"].shape == (8, 32)
    if method == "reglue":
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
        assert (tmp_path / "samples" / "grid-0000003.png").exists()
        with pytest.raises(ValueError, match="different config"):
            train(config(caches["full"], tmp_path, method="sit", max_steps=6))


def test_overfitting_one_batch_lowers_the_loss(caches, tmp_path):
    # the global batch is the whole cache: every step sees the same 32 samples
    train(config(caches["full"], tmp_path, global_batch=N, lr=1e-3, max_steps=40, log_every=10, ckpt_every=40))
    first, *_, last = log(tmp_path)
    assert last["loss"] < 0.9 * first["loss"]


def test_a_method_needs_its_inputs_in_the_cache(caches, tmp_path):
    with pytest.raises(ValueError, match="compressed.*train-compressor"):
        train(config(caches["bare"], tmp_path, method="reglue"), dry_run=True)
    resolved = train(config(caches["bare"], tmp_path, method="reg"), dry_run=True)
    assert resolved["model_kwargs"]["in_channels"] == 4 and resolved["model_kwargs"]["cls_dim"] == 32
    assert not (tmp_path / "config.json").exists()
    result = CliRunner().invoke(app, cli_train(caches["bare"], tmp_path, "--method", "reglue", "--dry-run")[3:])
    assert result.exit_code == 1 and "train-compressor" in result.output


def test_xl_runs_with_features_warn_when_the_lambda_schedule_is_off(caches, tmp_path):
    method = get_method("reglue")
    warning = xl_lam_warning(config(caches["full"], tmp_path, model="SiT-XL/2"), method)
    assert "250K" in warning and "--xl-lam-schedule" in warning and "\n" not in warning
    assert xl_lam_warning(config(caches["full"], tmp_path, model="SiT-XL/2", xl_lam_schedule=True), method) is None
    assert xl_lam_warning(config(caches["full"], tmp_path, model="SiT-B/2"), method) is None
    assert xl_lam_warning(config(caches["full"], tmp_path, model="SiT-XL/2"), get_method("reg")) is None  # no features
    # ReDi never had that schedule (its lambda is 1, transport.py:122): no warning
    assert xl_lam_warning(config(caches["full"], tmp_path, model="SiT-XL/2"), get_method("redi")) is None
    args = cli_train(caches["full"], tmp_path, "--method", "reglue", "--model", "SiT-XL/4", "--window", "512",
                     "--dry-run")[3:]
    result = CliRunner().invoke(app, args)  # a later --model overrides cli_train's tiny one
    assert result.exit_code == 0, result.output
    assert "warning: SiT-XL/4 with method reglue" in result.stderr and "--xl-lam-schedule" in result.stderr
    assert json.loads(result.stdout)["config"]["window"] == 512  # stdout is the JSON alone: a --config file
    result = CliRunner().invoke(app, [*args, "--xl-lam-schedule"])
    assert result.exit_code == 0 and "warning" not in result.output


# ---- the methods' own recipes -------------------------------------------------------------------

RECIPE_LINES = {  # SiT-tiny/2 aligns after block 1
    "sit": ("fp32", None, True, "recipe sit: fp32 (no autocast), no grad clipping, random horizontal flip "
            "(follows willisma/SiT train.py:"),
    "repa": ("bf16", 1.0, False, "recipe repa: bf16, grad clip 1, no flip, paper's DINOv2 dinov2_vitb14, REPA after "
             "block 1 (follows sihyun-yu/REPA train.py:"),
    "reg": ("bf16", 1.0, False, "recipe reg: bf16, grad clip 1, no flip, paper's DINOv2 dinov2_vitb14, REPA after "
            "block 1 (follows Martinser/REG train.sh:"),
    "redi": ("fp32", None, False, "recipe redi: fp32 (no autocast), no grad clipping, no flip, paper's DINOv2 "
             "dinov2_vitb14_reg, lambda 1 (follows zelaki/ReDi train_redi.py:"),
    "reglue": ("bf16", 1.0, False, "recipe reglue: bf16, grad clip 1, no flip, paper's DINOv2 dinov2_vitb14_reg, "
               "lambda 1, REPA after block 1 (follows giorgospets/reglue train.sh:"),
}


def test_dry_run_prints_each_methods_own_recipe(caches, tmp_path, capsys):
    for method, (precision, clip, flip, line) in RECIPE_LINES.items():
        resolved = train(config(caches["full"], tmp_path, method=method, precision=None), dry_run=True)
        out = capsys.readouterr().err  # the recipe and notes go to stderr: stdout is the JSON alone
        assert out.splitlines()[1].startswith(line), out  # after "run folder: RUN"
        assert (resolved["recipe"]["precision"], resolved["recipe"]["grad_clip"], resolved["recipe"]["flip"]) == \
            (precision, clip, flip)
        # the tiny cache holds DINOv2-reg4 targets: REPA's and REG's papers used the register-free model
        assert ("note: method " in out) == (method in ("repa", "reg")), out
    # flags override the recipe; --grad-clip 0 turns clipping off
    result = CliRunner().invoke(app, cli_train(caches["full"], tmp_path, "--method", "reglue", "--precision", "fp16",
                                               "--grad-clip", "0", "--encoder-depth", "2", "--dry-run")[3:])
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.stdout)
    assert resolved["recipe"]["precision"] == "fp16" and resolved["recipe"]["grad_clip"] is None
    assert resolved["model_kwargs"]["encoder_depth"] == 2 and "no grad clipping" in result.output


def test_a_flipping_recipe_needs_the_mirrored_views(caches, tmp_path):
    cache = str(tmp_path / "noflip.zarr")
    shutil.copytree(caches["bare"], cache)
    meta = zarr.open_group(cache, mode="r+").attrs["reglue"]
    dtypes = {k: v for k, v in meta["dtypes"].items() if k != "vae_moments_flip"}
    zarr.open_group(cache, mode="r+").attrs["reglue"] = {**meta, "dtypes": dtypes}
    result = CliRunner().invoke(app, cli_train(cache, tmp_path / "a", "--method", "sit", "--dry-run")[3:])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "no mirrored VAE moments" in result.output and "reglue extract SRC --out NEW --flip" in result.output
    assert train(config(cache, tmp_path / "a", method="sit", flip=False), dry_run=True)["recipe"]["flip"] is False
    with pytest.raises(ValueError, match="cannot train with flips"):  # no DINOv2 target of the mirrored crop
        train(config(caches["full"], tmp_path / "b", method="repa", flip=True), dry_run=True)


def test_flip_views_are_per_sample_draws_of_the_step(caches):
    cache = Cache.open(caches["bare"])
    stored, mirrored = cache.read("vae_moments"), cache.read("vae_moments_flip")
    # extract --flip stored the posterior of the mirrored crop (SiT flips after the crop, train.py:184-186)
    encoder = FeatureEncoder(EncoderSpec(preset="tiny", resolution=64))
    crops = torch.stack([torch.from_numpy(load_image(caches["images"] / p, 64)) for p in cache.source_paths(0, 2)])
    want = torch.cat(encoder.vae_posterior(crops.flip(-1)), dim=1).half().numpy()
    np.testing.assert_allclose(mirrored[:2].astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)
    assert not np.allclose(mirrored, stored[..., ::-1], atol=1e-2)  # not a mirror of the unflipped moments
    names = ("vae_moments", "vae_moments_flip", "labels")
    one = CacheLoader(cache, names, BATCH, seed=3, flip=True)
    two = [CacheLoader(cache, names, BATCH, seed=3, flip=True, rank=r, world=2) for r in (0, 1)]
    flips = []
    for k in range(4):
        batch = next(one)
        rows = batch["index"].numpy()
        flip = flip_draws(3, k, rows)
        assert "vae_moments_flip" not in batch
        np.testing.assert_array_equal(batch["vae_moments"].numpy(),
                                      np.where(flip[:, None, None, None], mirrored[rows], stored[rows]))
        for part in (next(loader) for loader in two):  # two processes: each sample takes the same view
            where = np.searchsorted(rows, part["index"].numpy())
            np.testing.assert_array_equal(part["vae_moments"].numpy(), batch["vae_moments"].numpy()[where])
        flips.append(flip)
        if k == 1:
            resumed = CacheLoader(cache, names, BATCH, seed=3, flip=True)
            resumed.load_state_dict(one.state_dict())
    for k in (2, 3):  # a loader resumed at step 2 takes the same views (and draws differ between steps)
        np.testing.assert_array_equal(flip_draws(3, k, next(resumed)["index"].numpy()), flips[k])
    assert 0 < np.concatenate(flips).sum() < len(np.concatenate(flips))
    for loader in (one, resumed, *two):
        loader.close()


def test_repa_and_cls_targets_come_from_the_last_block_of_the_layer_set(caches, tmp_path):
    cache = str(tmp_path / "layers8-10.zarr")
    shutil.copytree(caches["full"], cache)
    meta = zarr.open_group(cache, mode="r+").attrs["reglue"]
    zarr.open_group(cache, mode="r+").attrs["reglue"] = {**meta, "layers": [8, 9, 10]}  # its compressor's input
    with pytest.raises(ValueError, match=r"block 10 \(reference train.py:319-330\).*block 11 only"):
        train(config(cache, tmp_path / "run", method="reglue"), dry_run=True)
    # without REPA and the CLS token there is no target to take; the method records the cache's layer set
    assert layers_for(get_method("reglue", repa=False, cls=False), Cache.open(cache)).layers == (8, 9, 10)
    with pytest.raises(ValueError, match=r"asks for DINOv2 blocks \(11,\).*computed from blocks \(8, 9, 10, 11\)"):
        layers_for(get_method("reglue", layers=(11,)), Cache.open(caches["full"]))


def test_redi_pca_is_fitted_on_the_first_images_in_sorted_order(caches):
    cache = Cache.open(caches["bare"])
    rows = cache.valid_indices()
    D = cache.meta.dino_dim

    def moments(ids):
        x = decode_patches(cache.read("patches")[ids], cache.read("patches_scale")[ids]).reshape(-1, D).double()
        return pca_from_moments(x.sum(0), x.T @ x, len(x), 8)

    got, first, last = fit_pca(cache, 8, samples=12), moments(rows[:12]), moments(rows[-12:])
    torch.testing.assert_close(got.components, first.components, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got.components, last.components, atol=1e-2)


# ---- resume, processes, faults -----------------------------------------------------------------

def test_resume_after_sigkill_is_exact(caches, tmp_path):
    """Also: a second `train` on the folder stops at once naming the holder; the killed run's lock never
    blocks the rerun; the folder resumes after a move, addressed by a relative path (issue 12 items 5, 7)."""
    # method sit: its recipe (no clipping, random flips) makes the per-sample view choice part of what resumes
    straight, killed, moved = tmp_path / "straight", tmp_path / "killed", tmp_path / "moved"
    args = ("--max-steps", "6", "--method", "sit")
    ref = subprocess.Popen(cli_train(caches["full"], straight, *args), env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(cli_train(caches["full"], killed, *args), env={**ENV, PAUSE_ENV: "120"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_exists(proc, killed / "checkpoints" / "step-0000003")  # paused there (PAUSE_ENV)
    second = subprocess.run(cli_train(caches["full"], killed, *args), env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 1 and second.stderr.count("\n") == 1, second.stderr
    assert f"{killed} is in use by pid {proc.pid} on {socket.gethostname()} since" in second.stderr
    assert f"delete {killed / '.reglue-train.lock'}" in second.stderr and proc.poll() is None
    sigkill_when_exists(proc, killed / "checkpoints" / "step-0000003")
    assert not (killed / "checkpoints" / "step-0000006").exists()
    os.replace(killed, moved)
    rerun = subprocess.run(cli_train(caches["full"], "moved", *args), env=ENV, check=True, capture_output=True,
                           text=True, cwd=tmp_path)
    assert "resumed from moved/checkpoints/step-0000003 at step 3" in rerun.stdout
    assert ref.wait() == 0
    a, b = (load_file(run / "checkpoints" / "step-0000006" / "model.safetensors") for run in (straight, moved))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_a, ema_b = (torch.load(run / "checkpoints" / "step-0000006" / "ema.pt")["ema"] for run in (straight, moved))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert losses(straight) == losses(moved) and len(losses(moved)) == 6


def test_two_processes_equal_one(caches, tmp_path):
    cmd = ["torchrun", "--nproc_per_node", "2", "--standalone", *cli_train(caches["full"], tmp_path / "two",
           "--max-steps", "3")[1:]]
    subprocess.run(cmd, env=ENV, check=True, capture_output=True)
    # one process, the same global batch in two micro-batches of the per-process size: the same draws
    train(config(caches["full"], tmp_path / "one", micro_batch=BATCH // 2))
    one = load_file(tmp_path / "one" / "checkpoints" / "step-0000003" / "model.safetensors")
    two = load_file(tmp_path / "two" / "checkpoints" / "step-0000003" / "model.safetensors")
    assert one.keys() == {k.removeprefix("module.") for k in two}
    for k, v in two.items():
        torch.testing.assert_close(v, one[k.removeprefix("module.")], rtol=1e-5, atol=1e-6)
    for x, y in zip(losses(tmp_path / "one"), losses(tmp_path / "two"), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(caches, tmp_path):
    cache = str(tmp_path / "nan.zarr")
    shutil.copytree(caches["full"], cache)
    order, _ = epoch_order(Cache.open(cache).valid_indices(), CHUNK, TrainConfig.window // CHUNK, seed=0, epoch=0)
    zarr.open_group(cache, mode="r+")["vae_moments"][int(order[2 * BATCH])] = np.nan  # first sample of step 3
    with pytest.raises(FloatingPointError, match="non-finite loss at step 3.*step-0000002"):
        train(config(cache, tmp_path / "run", max_steps=6, ckpt_every=2))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000002"]
    assert [line["step"] for line in log(tmp_path / "run")] == [1, 2]


def test_reglue_on_a_cache_without_compressed_features_names_the_command_that_adds_them(caches, tmp_path):
    # `reglue extract` then `reglue train --cache` (the default method, reglue): one line with the command to run,
    # naming the images the cache was made from; nothing is written.
    with pytest.raises(ValueError) as err:
        train(config(caches["bare"], tmp_path / "run"))
    message = str(err.value)
    assert "lacks" in message and "\n" not in message
    assert f"reglue train-compressor --src {Path(caches['images']).resolve()} --out compressor/ --fill" in message
    assert not (tmp_path / "run").exists()
