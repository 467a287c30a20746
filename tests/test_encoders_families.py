"""The encoder is a choice: each family's tiny preset (DINOv2 with and without registers, DINOv3, CLIP),
its preprocessing from timm's config, and a DINOv2 and a DINOv3 store end to end (extract ->
train-compressor -> train), with every cross-encoder mix refused in one line, and export."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from reglue import weights
from reglue.cli import app
from reglue.pipeline.encoders import EncoderSpec, FeatureEncoder, preprocess_encoder
from reglue.pipeline.extract import ExtractConfig, extract, fill_compressed
from reglue.pipeline.store import Cache
from reglue.trainer.checkpoints import load_model
from reglue.trainer.compressor_train import CompressorConfig, train_compressor
from reglue.trainer.loop import TrainConfig, train
from reglue.trainer.runfolder import check_same_encoder

DINOV2_S = "vit_small_patch14_dinov2.lvd142m"  # no registers: the REPA / REG papers' kind of encoder
DINOV3_B = "vit_base_patch16_dinov3.lvd1689m"
CLIP_L = "vit_large_patch14_clip_224.openai"


def crops(n, seed=0):
    return torch.randint(0, 256, (n, 3, 64, 64), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("name, depth, registers, input_size", [
    (DINOV2_S, 12, 0, 56), (weights.DEFAULT_ENCODER, 12, 4, 56), (DINOV3_B, 12, 4, 64), (CLIP_L, 24, 0, 56),
    ("vit_giant_patch14_reg4_dinov2", 40, 4, 56),
])
def test_each_family_has_a_tiny_preset_with_its_tokens(name, depth, registers, input_size):
    spec = EncoderSpec.tiny(encoder=name)
    assert spec.layers == tuple(range(depth - 4, depth)) and spec.input_size == input_size and spec.grid == 4
    enc = FeatureEncoder(spec)
    out = enc.encode(crops(2), with_layers=True)
    assert {k: tuple(v.shape) for k, v in out.items() if k != "vae_std"} == {
        "vae_mean": (2, 4, 8, 8), "cls": (2, 32), "patches": (2, 16, 32), "layers": (2, 16, 128)}
    # [CLS] is prefix token 0 and the registers are dropped: the same tokens through forward_features
    with torch.no_grad():
        tokens = enc.vfm.forward_features(preprocess_encoder(crops(2), spec))  # [2, 1 + registers + 16, 32]
    assert tokens.shape[1] == 1 + registers + 16
    torch.testing.assert_close(out["cls"], tokens[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["patches"], tokens[:, 1 + registers:], rtol=0, atol=1e-6)
    m = enc.meta()
    assert (m["encoder"]["name"], m["encoder"]["registers"]) == (spec.encoder, registers)


def test_preprocessing_comes_from_timm_config():
    clip, v3, v2 = (EncoderSpec.tiny(encoder=n) for n in (CLIP_L, DINOV3_B, weights.DEFAULT_ENCODER))
    white = torch.full((1, 3, 64, 64), 255, dtype=torch.uint8)
    for spec, mean, std in ((clip, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                            (v2, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        torch.testing.assert_close(preprocess_encoder(white, spec)[0, :, 0, 0],
                                   (1 - torch.tensor(mean)) / torch.tensor(std))
    x = crops(1)  # DINOv3 /16 at 64 px feeds the crop itself: 4x4 patches, no resize
    torch.testing.assert_close(preprocess_encoder(x, v3), (x / 255. - torch.tensor(v3.arch.mean).view(3, 1, 1))
                               / torch.tensor(v3.arch.std).view(3, 1, 1), rtol=0, atol=0)
    assert v3.preprocessing()["resize"] is None and v2.preprocessing()["resize"]["size"] == 56
    # the same id with or without its tag is one encoder
    assert EncoderSpec(encoder="vit_base_patch16_dinov3").encoder == DINOV3_B


def test_encoders_without_the_contract_are_refused():
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        EncoderSpec(encoder="vit_base_patch16_siglip_256.webli")
    with pytest.raises(ValueError, match="not a timm model"):
        EncoderSpec(encoder="dinov2_vitb14_reg")
    with pytest.raises(ValueError, match="exceed the 12 blocks"):
        FeatureEncoder(EncoderSpec.tiny(encoder=DINOV3_B, layers=(9, 10, 11, 12)))


# ---- a DINOv2 and a DINOv3 store end to end ------------------------------------------------------

@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Per encoder: a tiny store of 8 images, its compressor (DINOv2: from the store's layers rows; DINOv3: from
    the images, the documented flow) filled into it, then 2 reglue steps."""
    root = tmp_path_factory.mktemp("families")
    rng = np.random.default_rng(0)
    for i in range(8):
        folder = root / "images" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (70, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = {"images": root / "images"}
    for tag, name in (("v2", DINOV2_S), ("v3", DINOV3_B)):
        cache, comp = str(root / f"{tag}.zarr"), str(root / f"{tag}-compressor")
        extract(ExtractConfig(str(root / "images"), cache, EncoderSpec.tiny(encoder=name),
                              layers_limit=8 if tag == "v2" else 0, chunk_size=4, batch_size=4, num_workers=0))
        source = dict(cache=cache) if tag == "v2" else dict(src=str(root / "images"),
                                                            spec=EncoderSpec.tiny(encoder=name, precision="fp32"))
        train_compressor(CompressorConfig(comp, fill=cache, epochs=1, steps_per_epoch=1, global_batch=4, bn_batch=4,
                                          hidden=8, num_workers=0, **source))
        train(TrainConfig(cache, str(root / f"{tag}-run"), model="SiT-tiny/2", max_steps=2, global_batch=4,
                          precision="fp32", log_every=1, ckpt_every=2, snapshot_every=2, sample_every=0, trackers=()))
        out[tag] = {"cache": cache, "compressor": Path(comp), "run": root / f"{tag}-run"}
    return out


def files(store):
    d = store["compressor"]
    return str(d / "compression_model.pth"), str(next(d.glob("dino_mean_std_*.pth")))


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_each_store_trains_and_records_its_encoder(stores):
    for tag, name in (("v2", DINOV2_S), ("v3", DINOV3_B)):
        cache = Cache.open(stores[tag]["cache"])
        assert cache.meta.encoder["name"] == name and cache.has("compressed")
        result = cli("cache", "info", stores[tag]["cache"])
        assert result.exit_code == 0 and f"encoder {name} (tiny weights" in result.output
        config = json.loads((stores[tag]["run"] / "config.json").read_text())
        assert config["method"]["layers"] == [8, 9, 10, 11] and config["cache"]["encoder_key"]["encoder"] == name
        assert len((stores[tag]["run"] / "log.jsonl").read_text().splitlines()) == 2
    assert "no resize" in cli("cache", "info", stores["v3"]["cache"]).output


def test_another_encoders_compressor_or_norm_stats_is_refused_in_one_line(stores, tmp_path):
    (v2_comp, v2_stats), (v3_comp, v3_stats) = files(stores["v2"]), files(stores["v3"])
    # same width (32) and grid, so the channel counts agree: only the recorded encoder tells them apart
    for comp, stats, culprit in ((v2_comp, v2_stats, v2_stats), (v3_comp, v2_stats, v2_stats),
                                 (v2_comp, v3_stats, v2_comp)):
        result = cli("fill-compressed", "--cache", stores["v3"]["cache"], "--compressor", comp, "--norm-stats", stats)
        assert result.exit_code == 1, result.output
        line = result.output.strip()
        assert "\n" not in line and culprit in line and DINOV2_S in line and DINOV3_B in line, line
    # an unrecorded (official-style) norm-stats file is taken as DINOv2-B-reg4's
    official = tmp_path / "dino_mean_std_8_9_10_11_64.pth"
    raw = torch.load(v3_stats, weights_only=False)
    torch.save({"mean": raw["mean"], "std": raw["std"]}, official)
    with pytest.raises(ValueError, match="records no encoder"):
        fill_compressed(stores["v3"]["cache"], v3_comp, str(official))
    # extract with another encoder's files, into a new store
    result = cli("extract", stores["images"], "--out", tmp_path / "new.zarr", "--weights", "tiny", "--resolution", 64,
                 "--encoder", DINOV3_B, "--compressor", v2_comp, "--norm-stats", v2_stats, "--num-workers", 0)
    assert result.exit_code == 1 and DINOV2_S in result.output and not (tmp_path / "new.zarr").exists()
    # train-compressor: given norm stats of another encoder, or a --fill cache of another encoder, before training
    with pytest.raises(ValueError, match=f"{v2_stats} was made from features of {DINOV2_S}.*{DINOV3_B}"):
        train_compressor(CompressorConfig(str(tmp_path / "c1"), src=str(stores["images"]), norm_stats=v2_stats,
                                          spec=EncoderSpec.tiny(encoder=DINOV3_B), num_workers=0))
    with pytest.raises(ValueError, match=f"--fill {stores['v3']['cache']} holds features of {DINOV3_B}"):
        train_compressor(CompressorConfig(str(tmp_path / "c2"), cache=stores["v2"]["cache"],
                                          fill=stores["v3"]["cache"]))


def test_a_store_is_never_resumed_with_another_encoder(stores, tmp_path):
    copy = tmp_path / "v2.zarr"
    shutil.copytree(stores["v2"]["cache"], copy)
    with pytest.raises(ValueError, match=f"holds features of encoder {DINOV2_S}.*this run asks for {DINOV3_B}"):
        extract(ExtractConfig(str(stores["images"]), str(copy), EncoderSpec.tiny(encoder=DINOV3_B), layers_limit=8,
                              chunk_size=4, batch_size=4, num_workers=0))
    # a run of the DINOv2 store, resumed on the DINOv3 store's features
    with pytest.raises(ValueError, match=f"trained on features of {DINOV2_S}.*now holds features of {DINOV3_B}"):
        check_same_encoder(stores["v2"]["run"], Cache.open(stores["v3"]["cache"]))


def test_export_round_trips_a_trained_run(stores, tmp_path):
    snapshot = stores["v3"]["run"] / "snapshots" / "ema-0000002.safetensors"
    ours, info = load_model(snapshot)
    result = cli("export", stores["v3"]["run"] / "checkpoints" / "step-0000002", "--format", "official",
                 "--out", tmp_path / "official.pt")
    assert result.exit_code == 0, result.output
    assert "`model` = the trained weights" in result.output  # the checkpoint folder has the non-EMA weights too
    theirs, official = load_model(tmp_path / "official.pt")  # the official-format import path
    assert official.meta["official_args"]["enc_type"] == DINOV3_B and official.method.layers == (8, 9, 10, 11)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, ours.in_channels, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([0, 2])
    cls = torch.randn(2, ours.cls_dim, generator=g)
    with torch.no_grad():
        for a, b in zip(ours(x, t, y, cls_token=cls), theirs(x, t, y, cls_token=cls)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_store_of_older_reglue_still_reads():
    """Before the encoder was a choice the metadata named it `dino` and the spec had `dino`, `dino_weights`."""
    from reglue.pipeline.store import CacheMeta

    encoders = {"preset": "tiny", "dino": {"name": weights.DEFAULT_ENCODER, "source": "x", "revision": None},
                "spec": {"preset": "tiny", "vae": weights.DEFAULT_VAE, "dino": weights.DEFAULT_ENCODER,
                         "dino_weights": None, "resolution": 64, "layers": [8, 9, 10, 11], "precision": "auto"}}
    meta = CacheMeta(num_samples=1, chunk_size=1, resolution=64, latent_channels=4, latent_size=8,
                     vae_scaling_factor=0.18215, dino_dim=32, num_patches=16, grid=4, layers=(8, 9, 10, 11),
                     layers_count=0, num_classes=0, class_names=(), encoders=encoders, patches_encoding="",
                     dtypes={}, source={}, versions={})
    assert meta.encoder_key() == {"encoder": weights.DEFAULT_ENCODER, "preset": "tiny", "layers": [8, 9, 10, 11],
                                  "width": 32, "grid": 4}
    assert meta.describe_encoder().startswith(f"encoder {weights.DEFAULT_ENCODER} (tiny weights")
    assert EncoderSpec.from_dict(encoders["spec"]) == EncoderSpec.tiny()
