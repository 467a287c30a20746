"""Checkpoints: our snapshot round trip, the official format loaded strictly, malicious files refused."""

import argparse
import json
import os

import pytest
import torch
from golden_models import one_thread  # noqa: F401  (autouse: one intra-op thread)

from reglue.pipeline.compressor import UnsafeFileError
from reglue.trainer.checkpoints import _official_config, export_model, load_model, save_snapshot, snapshot_payload
from reglue.trainer.models import build_sit, count_parameters, preset_kwargs
from reglue.trainer.objective import METHODS, XL_LAM_SCHEDULE, get_method
from reglue.trainer.statefiles import seal

KWARGS = dict(input_size=8, in_channels=8, num_classes=10, cls_dim=16, z_dims=(16,))  # 64 px, 4 feature channels
MODEL_KWARGS = {**preset_kwargs("SiT-tiny/2"), **KWARGS}


def random_sit(seed: int):
    torch.manual_seed(seed)
    model = build_sit("SiT-tiny/2", **KWARGS)
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def same_outputs(a, b):
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(2, 8, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([1, 10]))
    cls = torch.randn(2, 16, generator=g)
    with torch.no_grad():
        (xa, (za,), ca), (xb, (zb,), cb) = a(*args, cls_token=cls), b(*args, cls_token=cls)
    for ours, theirs in ((xa, xb), (za, zb), (ca, cb)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_snapshot_round_trip(tmp_path):
    ema = random_sit(0)
    path = tmp_path / "snapshots" / "0000100.safetensors"
    method = get_method("reglue", feature_channels=4)
    meta = dict(latent_channels=4, resolution=64, vae_scaling_factor=0.18215, cache="memory://x")
    save_snapshot(path, ema, model_kwargs=MODEL_KWARGS, method=method, step=100, meta=meta)
    # safetensors + its JSON config beside it; the tmp files were renamed, not left behind
    assert sorted(os.listdir(path.parent)) == ["0000100.json", "0000100.safetensors"]
    config = json.loads((tmp_path / "snapshots" / "0000100.json").read_text())
    assert config["step"] == 100 and config["meta"]["cache"] == "memory://x" and config["method"]["name"] == "reglue"
    (tmp_path / "step-0000100").mkdir()  # a training checkpoint folder holds the same config + weights as ema.pt
    torch.save(snapshot_payload(ema, model_kwargs=MODEL_KWARGS, method=method, step=100, meta=meta),
               tmp_path / "step-0000100" / "ema.pt")
    seal(tmp_path / "step-0000100")  # the manifest a training checkpoint carries (trainer.statefiles)
    for source in (path, tmp_path / "step-0000100"):
        model, info = load_model(source)
        same_outputs(model, ema)
        assert not model.training and not model.pos_embed.requires_grad
        assert (info.method, info.step, info.latent_channels, info.feature_channels) == (method, 100, 4, 4)
        assert (info.cls_dim, info.num_classes, info.resolution, info.vae_scaling_factor) == (16, 10, 64, 0.18215)
    with pytest.raises(ValueError, match="vae_scaling_factor"):
        save_snapshot(tmp_path / "bad.safetensors", ema, model_kwargs=MODEL_KWARGS, method=method, step=0,
                      meta=dict(latent_channels=4, resolution=64))
    with pytest.raises(TypeError, match=r"meta\['cache'\] is a PosixPath"):
        save_snapshot(tmp_path / "bad.safetensors", ema, model_kwargs=MODEL_KWARGS, method=method, step=0,
                      meta={**meta, "cache": tmp_path})
    with pytest.raises(ValueError, match="does not match method"):
        save_snapshot(tmp_path / "bad.safetensors", ema, model_kwargs=MODEL_KWARGS, method=METHODS["reglue"], step=0,
                      meta=meta)
    with pytest.raises(ValueError, match="a snapshot is a .safetensors file"):
        save_snapshot(tmp_path / "bad.pt", ema, model_kwargs=MODEL_KWARGS, method=method, step=0, meta=meta)
    from safetensors.torch import save_file  # a safetensors file that is no snapshot
    save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no reglue config in its header"):
        load_model(tmp_path / "plain.safetensors")


def official_checkpoint(path):
    """A file in the format train.py:376-387 writes, around a tiny SiT."""
    model, ema = random_sit(1), random_sit(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model(torch.randn(1, 8, 8, 8), torch.rand(1), torch.tensor([0]), cls_token=torch.randn(1, 16))[0].sum().backward()
    opt.step()
    args = official_args(model="SiT-tiny/2", resolution=64, num_classes=10, feat_channels=4, encoder_depth=1)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args,
                "steps": 400_000}, path)
    return ema


def test_official_checkpoint_loads_its_ema_strictly(tmp_path):
    ema = official_checkpoint(tmp_path / "0400000.pt")
    model, info = load_model(tmp_path / "0400000.pt")
    same_outputs(model, ema)
    assert info.step == 400_000 and info.feature_channels == 4 and info.cls_dim == 16 and info.resolution == 64
    assert info.method.features == "compressed" and info.method.layers == (8, 9, 10, 11)
    assert info.method.lam(400_000) == 1.0  # not an XL run: the reference keeps lambda


def official_args(**overrides) -> argparse.Namespace:
    """The args train.py pickles (parse_args, after `interm_layers` was split at train.py:174)."""
    return argparse.Namespace(**{**dict(
        model="SiT-XL/2", resolution=256, num_classes=1000, feat_channels=16, encoder_depth=8, fused_attn=True,
        qk_norm=False, cfg_prob=0.1, enc_type="dinov2-vit-b", lam=1.0, cls=0.03, proj_coeff=0.5,
        interm_layers=[8, 9, 10, 11], encoder_channel_list="3072,256,16", exp_name="x", seed=0), **overrides})


def test_official_xl_configuration_and_its_lambda_schedule():
    # Shapes only: the XL/2 mapping is checked at full size without building 685 M parameters.
    kwargs, method, meta = _official_config(official_args(), {"projectors.0.4.weight": torch.zeros(768, 2048)})
    assert count_parameters("SiT-XL/2", **kwargs) == 685_164_880
    assert (kwargs["in_channels"], kwargs["cls_dim"], kwargs["encoder_depth"]) == (20, 768, 8)
    # The XL run halved lambda from 250K and quartered it from 500K (train.py:349-354).
    assert method.lam_schedule == XL_LAM_SCHEDULE and meta["resolution"] == 256


class Exploit:
    """Unpickling this runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"ema": random_sit(0).state_dict(), "args": Exploit(marker), "steps": 1}, path)
    with pytest.raises(UnsafeFileError, match="refused to load"):
        load_model(path)
    assert not marker.exists()


def test_missing_or_foreign_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="official REGLUE checkpoint"):
        load_model(tmp_path / "none.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither a reglue snapshot"):
        load_model(tmp_path / "other.pt")


# ---- export ---------------------------------------------------------------------------------------

def test_export_official_round_trips_through_the_official_import(tmp_path):
    ema = random_sit(4)
    method = get_method("reglue", feature_channels=4, layers=(20, 21, 22, 23), compressor_hidden=32)
    train = {"global_batch": 256, "lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.0, "adam_eps": 1e-8,
             "grad_clip": 1.0, "seed": 3, "max_steps": 400_000, "ckpt_every": 10_000, "tf32": True,
             "precision": "bf16", "out": "runs/b2"}
    meta = dict(latent_channels=4, resolution=64, vae_scaling_factor=0.18215, train=train,
                encoders={"preset": "tiny", "encoder": {"name": "vit_large_patch16_dinov3.lvd1689m"}},
                compressor={"file": "compression_model.pth", "channels": [64, 32, 4],
                            "norm_stats": {"file": "dino_mean_std_20_21_22_23_64.pth"}})
    save_snapshot(tmp_path / "ema.safetensors", ema, model_kwargs=MODEL_KWARGS, method=method, step=7, meta=meta)
    path, note = export_model(tmp_path / "ema.safetensors", "official", tmp_path / "official.pt")
    assert "python generate.py --ckpt" in note and "--projector-embed-dims 16 --cls 16" in note
    # what the official generate.py reads: ckpt['ema'] into SiT_models[args.model] (generate.py:73-95)
    raw = torch.load(path, weights_only=False)
    assert sorted(raw) == ["args", "ema", "model", "steps"] and isinstance(raw["args"], argparse.Namespace)
    a = raw["args"]
    assert (a.model, a.resolution, a.feat_channels, a.interm_layers, a.encoder_channel_list, a.encoder_depth) == (
        "SiT-tiny/2", 64, 4, [20, 21, 22, 23], "64,32,4", 1)
    assert (a.batch_size, a.learning_rate, a.seed, a.mixed_precision, a.exp_name) == (256, 1e-4, 3, "bf16", "b2")
    assert (a.enc_type, a.norm_stats, a.cls, a.proj_coeff) == ("vit_large_patch16_dinov3.lvd1689m",
                                                               "dino_mean_std_20_21_22_23_64.pth", 0.03, 0.5)
    model, info = load_model(path)  # the official-format import path
    same_outputs(model, ema)
    assert (info.step, info.feature_channels, info.method.layers, info.method.features) == (7, 4, (20, 21, 22, 23),
                                                                                           "compressed")
    assert info.meta["encoders"]["preset"] == "tiny"  # carried in args.reglue_meta: sampling picks the tiny VAE
    # and back to safetensors, which `reglue sample` reads
    export_model(path, "safetensors", tmp_path / "again.safetensors")
    again, _ = load_model(tmp_path / "again.safetensors")
    same_outputs(again, ema)


def test_export_refuses_what_the_official_code_cannot_hold(tmp_path):
    kwargs = {**preset_kwargs("SiT-tiny/2"), **KWARGS, "in_channels": 4, "cls_dim": None}
    torch.manual_seed(0)
    from reglue.trainer.models import SiT
    save_snapshot(tmp_path / "repa.safetensors", SiT(**kwargs), model_kwargs=kwargs, method=METHODS["repa"], step=1,
                  meta=dict(latent_channels=4, resolution=64, vae_scaling_factor=0.18215))
    with pytest.raises(ValueError, match="official code trains and samples REGLUE models only"):
        export_model(tmp_path / "repa.safetensors", "official", tmp_path / "x.pt")
    with pytest.raises(ValueError, match="unknown export format"):
        export_model(tmp_path / "repa.safetensors", "onnx", tmp_path / "x.onnx")
