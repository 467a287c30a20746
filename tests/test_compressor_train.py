"""`reglue train-compressor --src`: the documented flow on the tiny preset (extract with the defaults ->
train-compressor on the images -> compressed features filled without the VAE), the reference's batch
layout, BatchNorm groups, and resume after SIGKILL bitwise equal to an uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from images import write_class_images
from killing import sigkill_when_exists
from safetensors.torch import load_file
from torch.utils.data.distributed import DistributedSampler

from reglue import weights
from reglue.pipeline.compressor import EncoderDecoder, NormStats, compress, load_compressor, load_norm_stats
from reglue.pipeline.encoders import EncoderSpec, FeatureEncoder
from reglue.pipeline.extract import ExtractConfig, extract
from reglue.pipeline.sources import load_image, scan
from reglue.pipeline.store import Cache
from reglue.trainer.compressor_data import GroupSampler, Layout
from reglue.trainer.compressor_train import CompressorConfig, reconstruction_loss, train_compressor, train_step
from reglue.trainer.runfolder import PAUSE_ENV

N, RES, STATS_IMAGES = 25, 64, 16  # 24 images + 1 truncated file; norm stats over the first 16
ARGS = dict(global_batch=8, bn_batch=4, epochs=2, ckpt_every=3, num_workers=0, norm_stats_images=STATS_IMAGES)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """The README's flow: `extract` with its defaults (no layers rows), then `train-compressor --src --fill`,
    with every VAE load refused during the second stage."""
    root = tmp_path_factory.mktemp("compressor")
    write_class_images(root / "images", N - 1, classes=3, name="{i:02d}.png")
    (root / "images" / "class1" / "zz.png").write_bytes((root / "images" / "class0" / "00.png").read_bytes()[:200])
    cache = str(root / "cache.zarr")
    extract(ExtractConfig(str(root / "images"), cache, EncoderSpec.tiny(RES), chunk_size=8, batch_size=8,
                          num_workers=0))
    moments = Cache.open(cache).read("vae_moments")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weights, "load_vae", lambda *a, **k: pytest.fail("the VAE was loaded after extract"))
        train_compressor(CompressorConfig(str(root / "straight"), src=str(root / "images"), fill=cache,
                                          spec=EncoderSpec.tiny(RES, precision="fp32"), **ARGS))
    return {"root": root, "images": root / "images", "cache": cache, "run": root / "straight", "moments": moments}


def test_the_flow_trains_on_the_images_and_fills_the_cache_without_the_vae(flow):
    run, cache = flow["run"], Cache.open(flow["cache"])
    assert cache.meta.layers_count == 0 and cache.has("compressed")  # extract's defaults fed the compressor
    assert np.array_equal(cache.read("vae_moments"), flow["moments"])
    report = json.loads((run / "compressor.json").read_text())
    assert report["plan"]["steps_per_epoch"] == N // 8 and report["steps"] == 2 * (N // 8)  # drop_last
    assert [(s["path"], s["reason"][:7]) for s in report["skipped"]] == [("class1/zz.png", "OSError")]
    # norm stats: the first 16 images in source order, fp32, population std (calc_norm_stats.py)
    encoder = FeatureEncoder(EncoderSpec.tiny(RES, precision="fp32"), with_vae=False)
    sources = scan(flow["images"])
    crops = torch.stack([torch.from_numpy(load_image(sources.path(i), RES)) for i in range(STATS_IMAGES)])
    layers = encoder.layers(crops).double().reshape(-1, 4 * encoder.width)
    stats = load_norm_stats(run / "dino_mean_std_8_9_10_11_64.pth")
    torch.testing.assert_close(stats.mean.double(), layers.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.std.double(), layers.std(0, correction=0), rtol=1e-5, atol=1e-5)
    # the filled features: the new compressor on each valid image's DINOv2 layers (fp16-rounded, as stored)
    valid = cache.valid_indices()[:6]
    crops = torch.stack([torch.from_numpy(load_image(sources.path(int(i)), RES)) for i in valid])
    with torch.no_grad():
        want = compress(load_compressor(run / "compression_model.pth").encoder, encoder.layers(crops).half(), stats)
    torch.testing.assert_close(torch.from_numpy(cache.read("compressed")[valid]).float(), want, rtol=2e-3, atol=2e-3)



def test_a_rerun_is_done_and_other_runs_are_refused_before_training(flow, tmp_path, capsys):
    config = lambda out, **kw: CompressorConfig(str(out), src=str(flow["images"]),
                                                spec=EncoderSpec.tiny(RES, precision="fp32"), **{**ARGS, **kw})
    train_compressor(config(flow["run"], fill=flow["cache"]))  # the same command: nothing is trained or filled
    assert "(already done)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="different config.*bn_batch: 4 there, 2 now"):
        train_compressor(config(flow["run"], bn_batch=2))
    with pytest.raises(ValueError, match="already holds compressed features from compression_model.pth"):
        train_compressor(config(tmp_path / "other", seed=1, fill=flow["cache"]))
    assert not (tmp_path / "other").exists()


def test_layers_alone_equal_the_full_encode():
    images = torch.randint(0, 256, (2, 3, RES, RES), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    full = FeatureEncoder(EncoderSpec.tiny(RES)).encode(images, with_layers=True)["layers"]
    assert torch.equal(FeatureEncoder(EncoderSpec.tiny(RES), with_vae=False).layers(images), full)


def test_resume_after_sigkill_is_bitwise_equal(flow, tmp_path, capsys):
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "reglue.cli", "train-compressor", "--src", str(flow["images"]), "--out", str(killed),
           "--weights", "tiny", "--resolution", str(RES), *(f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items())]
    proc = subprocess.Popen(cmd, env={**ENV, PAUSE_ENV: "120"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sigkill_when_exists(proc, killed / "checkpoints" / "step-0000003")
    assert not (killed / "compression_model.pth").exists()
    train_compressor(CompressorConfig(str(killed), src=str(flow["images"]),
                                      spec=EncoderSpec.tiny(RES, precision="fp32"), **ARGS))  # the same run
    assert f"resumed from {killed / 'checkpoints' / 'step-0000003'} at step 3" in capsys.readouterr().out
    straight = flow["run"]
    assert (killed / "compression_model.pth").read_bytes() == (straight / "compression_model.pth").read_bytes()
    last = Path("checkpoints") / "step-0000006"
    a, b = load_file(straight / last / "state.safetensors"), load_file(killed / last / "state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # AE, BN stats, Adam, RNG
    assert (straight / last / "state.json").read_text() == (killed / last / "state.json").read_text()



def test_two_processes_train_what_one_does(flow, tmp_path):
    two = tmp_path / "two"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "reglue.cli", "train-compressor",
           "--src", str(flow["images"]), "--out", str(two), "--weights", "tiny", "--resolution", str(RES),
           *(f"--{k.replace('_', '-')}={v}" for k, v in {**ARGS, "epochs": 1}.items())]
    subprocess.run(cmd, env=ENV, check=True, capture_output=True)
    stats = [load_norm_stats(run / "dino_mean_std_8_9_10_11_64.pth") for run in (flow["run"], two)]
    torch.testing.assert_close(stats[1].std, stats[0].std, rtol=1e-6, atol=0)
    last = Path("checkpoints") / "step-0000003"  # 1 epoch = the straight run's first 3 steps
    a, b = load_file(flow["run"] / last / "state.safetensors"), load_file(two / last / "state.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # the same groups, BatchNorm batches and running statistics; only the gradient sums' order differs
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)



def test_a_non_finite_loss_stops_before_anything_is_saved(flow, tmp_path, monkeypatch):
    import reglue.trainer.compressor_train as ct

    monkeypatch.setattr(ct, "reconstruction_loss", lambda model, layers, stats: model(layers.new_full(
        (len(layers), layers.shape[-1], 4, 4), float("nan")))[0].mean())
    with pytest.raises(FloatingPointError, match="non-finite reconstruction loss at step 1.*none yet"):
        train_compressor(CompressorConfig(str(tmp_path / "nan"), src=str(flow["images"]),
                                          spec=EncoderSpec.tiny(RES, precision="fp32"), **ARGS))
    assert not (tmp_path / "nan" / "checkpoints").exists()
    with pytest.raises(ValueError, match="finite"):
        NormStats(torch.full((3,), float("inf")), torch.ones(3))


# ---- the batch layout and the step ------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 4])
def test_groups_are_the_reference_ranks_batches_with_set_epoch_fixed(world):
    """Group g of step k = rank g's batch k of the reference's 8-GPU DistributedSampler (seed + epoch)."""
    n, batch, bn, seed = 100, 16, 2, 3
    steps = n // batch  # drop_last
    mine = [list(GroupSampler(n, Layout(batch, bn, r, world), steps, seed, 0, 2 * steps)) for r in range(world)]
    per = 8 // world  # groups per process and step; process r holds groups [r * per, (r + 1) * per)
    for epoch in range(2):
        ranks = []
        for rank in range(8):
            sampler = DistributedSampler(range(n), num_replicas=8, rank=rank, shuffle=True, seed=seed)
            sampler.set_epoch(epoch)  # what the reference omits: every epoch would replay epoch 0
            ranks.append(list(sampler))
        for k in range(steps):
            for g in range(8):
                assert mine[g // per][(epoch * steps + k) * per + g % per] == ranks[g][k * bn:(k + 1) * bn]


def test_groups_accumulate_to_the_mean_and_only_group_0_moves_the_running_stats():
    from accelerate import Accelerator

    torch.manual_seed(0)
    layers = torch.randn(8, 16, 12)  # 2 groups of 4 samples, 4 x 4 tokens, 12 channels
    stats = NormStats(torch.zeros(12), torch.ones(12))
    model, by_hand, group0 = (EncoderDecoder([12, 8, 4]) for _ in range(3))
    by_hand.load_state_dict(model.state_dict())
    group0.load_state_dict(model.state_dict())
    train_step(Accelerator(cpu=True), model, torch.optim.SGD(model.parameters(), lr=1.0), iter(layers.split(4)),
               stats, Layout(global_batch=8, bn_batch=4))
    # the gradient: the mean of the two groups' losses, each group with its own batch statistics
    (sum(reconstruction_loss(by_hand, g, stats) for g in layers.split(4)) / 2).backward()
    for name, p in by_hand.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name], p.detach() - p.grad, rtol=1e-5, atol=1e-6)
    # the running statistics: group 0's alone, as the reference's rank 0 file
    reconstruction_loss(group0, layers[:4], stats)
    buffers = [(k, v) for k, v in group0.state_dict().items() if "running" in k or "num_batches" in k]
    assert buffers and all(torch.equal(model.state_dict()[k], v) for k, v in buffers)
