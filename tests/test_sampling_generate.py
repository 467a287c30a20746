"""`reglue sample`: the npz layout, per-sample seeding, resume, and 1 vs 2 processes."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from reglue.cli import app
from reglue.trainer.checkpoints import save_snapshot
from reglue.trainer.generate import GenerateConfig, generate, generate_images
from reglue.trainer.models import build_sit, preset_kwargs
from reglue.trainer.objective import get_method
from reglue.trainer.sampling import SamplerConfig

# A REGLUE-shaped tiny model: 4 latent + 4 feature channels, CLS 16, latent 8 (64 px with the tiny VAE).
KWARGS = dict(input_size=8, in_channels=8, num_classes=10, cls_dim=16, z_dims=(16,))
FAST = ["--num-steps", "3", "--weights", "tiny", "--cpu", "--grid", "4"]


def tiny_sit(seed: int = 0):
    torch.manual_seed(seed)
    model = build_sit("SiT-tiny/2", **KWARGS)
    for p in model.parameters():  # non-zero outputs (the reference init zeroes the output layers)
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def snapshot(path, **meta):
    save_snapshot(path, tiny_sit(), model_kwargs={**preset_kwargs("SiT-tiny/2"), **KWARGS},
                  method=get_method("reglue", feature_channels=4), step=100,
                  meta=dict(latent_channels=4, resolution=64, vae_scaling_factor=0.18215, **meta))
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path):
    return snapshot(tmp_path / "ckpt" / "0000100.safetensors")


def test_the_vae_preset_comes_from_the_snapshot(tmp_path, monkeypatch):
    # a model trained on a tiny-preset cache decodes with the tiny VAE without --vae-preset; offline, the real
    # VAE would fail at once, so a sample proves the choice
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = snapshot(tmp_path / "tiny.safetensors", encoders={"preset": "tiny"})
    run_cli("sample", path, "--num", 1, "--batch-size", 1, "--num-steps", 2, "--cpu", "--grid", 0)
    with np.load(tmp_path / "tiny-sde2-cfg2.3-seed0-1.npz") as z:
        assert z["arr_0"].shape == (1, 64, 64, 3)


def run_cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_sample_npz_layout_and_resume(tiny_checkpoint, tmp_path):
    out = tmp_path / "s.npz"
    run_cli("sample", tiny_checkpoint, "--num", 5, "--out", out, "--batch-size", 2, *FAST,
            "--png-dir", tmp_path / "png", "--labels", "balanced")
    with np.load(out) as z:
        assert sorted(z.files) == ["arr_0", "arr_1", "config"]  # config: the sampling record
        images, labels = z["arr_0"], z["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (5, 64, 64, 3)  # ADM: uint8 NHWC
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 3, 4]  # balanced: index % classes
    assert images.std() > 1 and len({img.tobytes() for img in images}) == 5
    assert sorted(os.listdir(tmp_path / "png")) == [f"{i:06d}.png" for i in range(5)]
    assert (tmp_path / "s.grid.png").exists() and not (tmp_path / "s.npz.parts").exists()

    # Resume: a finished part is kept, the missing one made again, the merge is the same.
    cfg = GenerateConfig(checkpoint=str(tiny_checkpoint), out=str(tmp_path / "r.npz"), num=5, batch_size=2,
                         part_size=2, sampler=SamplerConfig(num_steps=3), labels="balanced",
                         vae_preset="tiny", cpu=True, grid=0)
    parts = tmp_path / "r.npz.parts"
    parts.mkdir()
    (parts / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="another configuration"):
        generate(cfg)
    (parts / "config.json").unlink()
    generate(GenerateConfig(**{**cfg.__dict__, "num": 4, "out": str(tmp_path / "first4.npz")}))
    planted = np.full((2, 64, 64, 3), 7, np.uint8)  # stands for part 0, already done
    np.savez(parts / "part-00000.npz", images=planted, labels=np.array([0, 1]))
    generate(cfg)
    with np.load(tmp_path / "r.npz") as z, np.load(tmp_path / "first4.npz") as first:
        assert (z["arr_0"][:2] == 7).all()  # part 0 was not redone
        np.testing.assert_array_equal(z["arr_0"][2:4], first["arr_0"][2:4])  # part size and num don't matter
        np.testing.assert_array_equal(z["arr_0"][4], images[4])


def test_sample_depends_on_seed_and_index_only():
    model = tiny_sit()
    from reglue import weights

    vae = weights.load_vae(preset="tiny")
    kw = dict(seed=3, latent_channels=4, scaling_factor=0.18215, sampler=SamplerConfig(num_steps=3))
    a, ya = generate_images(model, vae, [0, 1, 2], **kw)
    b, yb = generate_images(model, vae, [2, 0], **kw)
    c, _ = generate_images(model, vae, [0], **{**kw, "seed": 4})
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1]) and ya[2] == yb[0]
    assert not torch.equal(a[0], c[0])


@pytest.mark.slow
def test_one_and_two_processes_give_identical_samples(tiny_checkpoint, tmp_path):
    # "-n": torchrun's argparse takes "--num" for an abbreviation of its own --numa-binding.
    args = ["sample", str(tiny_checkpoint), "-n", "6", "--batch-size", "2", "--part-size", "2", *FAST]
    # One thread everywhere: on a CPU the thread count changes float reduction order (as GPU models would).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_cli(*args, "--out", tmp_path / "one.npz")
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "reglue.cli", *args, "--out", str(tmp_path / "two.npz")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        np.testing.assert_array_equal(one["arr_0"], two["arr_0"])
        np.testing.assert_array_equal(one["arr_1"], two["arr_1"])


def test_sample_from_an_official_checkpoint(tmp_path):
    from test_models_checkpoints import official_checkpoint  # the format train.py:376-387 writes

    official_checkpoint(tmp_path / "0400000.pt")
    run_cli("sample", tmp_path / "0400000.pt", "--num", 2, "--batch-size", 2, *FAST)
    name = GenerateConfig(str(tmp_path / "0400000.pt"), num=2, sampler=SamplerConfig(num_steps=3),
                          vae_preset="tiny").out_path.name  # 0400000-sde3-cfg2.3-seed0-2-<hash of vae_preset>.npz
    with np.load(tmp_path / name) as z:
        assert z["arr_0"].shape == (2, 64, 64, 3) and z["arr_1"].max() < 10


def test_an_unconditional_model_samples_with_the_null_label_only():
    """A flat (unlabelled) folder gives num_classes 0: every label is the null id 0, no guidance."""
    from reglue import weights

    torch.manual_seed(0)
    model = build_sit("SiT-tiny/2", **{**KWARGS, "num_classes": 0}).eval()
    vae = weights.load_vae(preset="tiny")
    for labels in ("random", "balanced"):
        images, y = generate_images(model, vae, [0, 1, 2], seed=0, latent_channels=4, scaling_factor=0.18215,
                                    sampler=SamplerConfig(num_steps=3), labels=labels)
        assert images.shape == (3, 64, 64, 3) and y.tolist() == [0, 0, 0]
