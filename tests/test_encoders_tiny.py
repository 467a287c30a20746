"""The tiny preset end to end: specs, shapes, determinism, batching, precision, weights plumbing."""

import pytest
import torch
import torch.nn.functional as F

from reglue import weights
from reglue.pipeline.encoders import EncoderSpec, FeatureEncoder, preprocess_encoder, resolve_precision


@pytest.fixture(scope="module")
def encoder():
    return FeatureEncoder(EncoderSpec.tiny())


def crops(n, r=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, r, r), generator=g, dtype=torch.uint8)


def test_spec_derives_dims():
    s = EncoderSpec()
    assert (s.latent_size, s.input_size, s.grid, s.num_patches, s.layers) == (32, 224, 16, 256, (8, 9, 10, 11))
    t = EncoderSpec.tiny()
    assert (t.resolution, t.latent_size, t.input_size, t.grid, t.num_patches) == (64, 8, 56, 4, 16)
    assert EncoderSpec(resolution=512).input_size == 448       # reference 224 * (512 // 256)
    for bad in [dict(resolution=100), dict(precision="int8"), dict(preset="huge"), dict(layers=(9, 8))]:
        with pytest.raises(ValueError):
            EncoderSpec(**bad)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_shapes_meta_and_layer_order(encoder):
    out = encoder.encode(crops(3), with_layers=True)
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {"vae_mean": (3, 4, 8, 8), "vae_std": (3, 4, 8, 8), "cls": (3, 32),
                      "patches": (3, 16, 32), "layers": (3, 16, 4 * 32)}
    assert all(v.dtype == torch.float32 for v in out.values())
    assert (out["vae_std"] > 0).all()
    # layers = [L8|L9|L10|L11], each through the final norm; L11 is the REPA target itself
    assert torch.equal(out["layers"][..., -32:], out["patches"])
    assert not torch.equal(out["layers"][..., :32], out["patches"])
    assert "layers" not in encoder.encode(crops(1))
    m = encoder.meta()
    assert (m["latent_channels"], m["latent_size"], m["width"], m["num_patches"], m["grid"]) == (4, 8, 32, 16, 4)
    assert m["layers"] == [8, 9, 10, 11] and m["vae_scaling_factor"] == 0.18215 and m["precision"] == "fp32"
    assert "NOT for real use" in m["vae"]["source"] and "NOT for real use" in m["encoder"]["source"]


def test_deterministic_and_batch_independent(encoder):
    x = crops(4, seed=1)
    a = encoder.encode(x, with_layers=True)
    b = FeatureEncoder(EncoderSpec.tiny()).encode(x, with_layers=True)      # fresh seeded models
    assert all(torch.equal(a[k], b[k]) for k in a)
    one = encoder.encode(x[2:3], with_layers=True)
    for k in a:
        torch.testing.assert_close(one[k], a[k][2:3], atol=1e-5, rtol=1e-5)


def test_input_validation(encoder):
    with pytest.raises(ValueError, match="uint8"):
        encoder.encode(crops(1).float())
    with pytest.raises(ValueError, match="uint8"):
        encoder.encode(crops(1, r=32))
    with pytest.raises(ValueError, match="exceed the 12 blocks"):
        FeatureEncoder(EncoderSpec.tiny(layers=(8, 12)))


def test_bf16_autocast_stays_close(encoder):
    x = crops(2, seed=2)
    ref = encoder.encode(x)
    low = FeatureEncoder(EncoderSpec.tiny(precision="bf16"), vae=encoder.vae, vfm=encoder.vfm).encode(x)
    assert all(v.dtype == torch.float32 for v in low.values())
    assert F.cosine_similarity(low["patches"], ref["patches"], dim=-1).mean() > 0.9995
    assert F.cosine_similarity(low["vae_mean"].flatten(1), ref["vae_mean"].flatten(1)).min() > 0.999


def test_non_finite_reduced_precision_batch_is_redone_in_fp32(encoder, monkeypatch):
    x = crops(2, seed=3)
    low = FeatureEncoder(EncoderSpec.tiny(precision="bf16"), vae=encoder.vae, vfm=encoder.vfm)
    forward = low._forward

    def overflowing(images, with_layers, precision):
        out = forward(images, with_layers, precision)
        if precision != "fp32":
            out["patches"][0, 0, 0] = float("inf")
        return out

    monkeypatch.setattr(low, "_forward", overflowing)
    out = low.encode(x)
    assert all(torch.equal(out[k], v) for k, v in encoder.encode(x).items())


def test_preprocess_encoder_order():
    # normalise first, then resize: a constant image stays constant at the normalised value
    x = torch.full((1, 3, 64, 64), 255, dtype=torch.uint8)
    y = preprocess_encoder(x, EncoderSpec.tiny())
    assert y.shape == (1, 3, 56, 56)
    torch.testing.assert_close(y[0, :, 0, 0],
                               (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


def test_tiny_weights_are_the_reference_architectures():
    mse = weights.load_vae("stabilityai/sd-vae-ft-mse", "tiny")
    ema = weights.load_vae("stabilityai/sd-vae-ft-ema", "tiny")
    assert all(torch.equal(a, b) for a, b in zip(mse.state_dict().values(), ema.state_dict().values()))
    assert type(mse).__name__ == "AutoencoderKL" and len(mse.config.block_out_channels) == 4
    with torch.no_grad():   # /8 down, 4 latent channels, decode back to image size
        z = mse.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        assert z.shape == (1, 4, 8, 8) and mse.decode(z).sample.shape == (1, 3, 64, 64)
    vit = weights.load_encoder(preset="tiny", img_size=56)
    assert (len(vit.blocks), vit.embed_dim, vit.num_reg_tokens, vit.no_embed_class) == (12, 32, 4, True)
    assert vit.patch_embed.patch_size == (14, 14) and not vit.training
    with pytest.raises(ValueError, match="preset"):
        weights.load_vae(preset="small")
