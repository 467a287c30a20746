"""Real-weight loading without a network: clear offline errors, and local copies that load."""

import time

import huggingface_hub.constants
import pytest
import torch

from reglue import weights


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache, whatever this machine has cached."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(weights.DINOV2_WEIGHTS_ENV, raising=False)
    monkeypatch.delenv(weights.ENCODER_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("name, parts", [
    ("vit_base_patch14_reg4_dinov2.lvd142m",
     ["timm/vit_base_patch14_reg4_dinov2.lvd142m", "dl.fbaipublicfiles.com/dinov2"]),
    ("vit_base_patch16_dinov3", ["vit_base_patch16_dinov3.lvd1689m", "timm/vit_base_patch16_dinov3.lvd1689m"]),
])
def test_offline_encoder_error_names_weights_source_and_fix(offline, name, parts):
    t0 = time.perf_counter()
    with pytest.raises(weights.WeightsUnavailable) as e:
        weights.load_encoder(name, img_size=224 if "patch14" in name else 256)
    msg = str(e.value)
    for part in parts + ["--encoder-weights", "REGLUE_ENCODER_WEIGHTS", "HF_HUB_OFFLINE", "hf download"]:
        assert part in msg
    assert "\n" not in msg and time.perf_counter() - t0 < 10  # one line; offline means no network retries


def test_offline_vae_error_names_weights_source_and_fix(offline):
    with pytest.raises(weights.WeightsUnavailable) as e:
        weights.load_vae("stabilityai/sd-vae-ft-ema")
    msg = str(e.value)
    for part in ["stabilityai/sd-vae-ft-ema", "https://huggingface.co/stabilityai/sd-vae-ft-ema",
                 "config.json", "HF_HOME"]:
        assert part in msg


def test_local_vae_folder_loads_offline(offline, tmp_path):
    weights.tiny_vae().save_pretrained(tmp_path / "vae")
    vae = weights.load_vae(str(tmp_path / "vae"))
    ref = weights.tiny_vae()
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), ref.state_dict().values()))
    assert vae.reglue_weights["source"] == str((tmp_path / "vae").resolve()) and not vae.training
    with pytest.raises(weights.WeightsUnavailable, match="not a diffusers"):
        weights.load_vae(str(tmp_path))


def hub_format_state(model: torch.nn.Module) -> dict:
    """The official torch.hub layout of a timm reg4 DINOv2 at 518 px (the inverse of timm's conversion).

    The hub class slot of pos_embed is zero so that `cls_token + pos_embed[:, 0]` is exact."""
    s = {k: v.clone() for k, v in model.state_dict().items()}
    d = s["cls_token"].shape[-1]
    s["pos_embed"] = torch.cat([torch.zeros(1, 1, d), s["pos_embed"]], dim=1)
    s["register_tokens"] = s.pop("reg_token")
    s["mask_token"] = torch.zeros(1, d)
    for k in [k for k in s if ".mlp.fc" in k]:
        s[k] = s.pop(k)  # plain-mlp DINOv2 uses the same fc1/fc2 names as timm
    return s


def test_local_hub_file_loads_through_env_and_resamples(offline, monkeypatch, tmp_path):
    # vit_small is the smallest reg4 DINOv2 timm has weights for: a 22M-parameter file
    name = "vit_small_patch14_reg4_dinov2.lvd142m"
    at518 = weights.build_encoder("vit_small_patch14_reg4_dinov2", img_size=518, weight_init="skip")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in at518.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    torch.save(hub_format_state(at518), tmp_path / "hub.pth")
    monkeypatch.setenv(weights.DINOV2_WEIGHTS_ENV, str(tmp_path / "hub.pth"))
    model = weights.load_encoder(name, img_size=224)
    assert model.pos_embed.shape == (1, 16 * 16, 384) and model.reglue_weights["source"].endswith("hub.pth")
    assert torch.equal(model.cls_token, at518.cls_token) and torch.equal(model.reg_token, at518.reg_token)
    assert torch.equal(model.blocks[3].attn.qkv.weight, at518.blocks[3].attn.qkv.weight)
    # the timm layout (what the HF Hub `timm/` repo serves) loads to the same model
    from safetensors.torch import save_file
    save_file(at518.state_dict(), str(tmp_path / "model.safetensors"))
    timm_model = weights.load_encoder(name, img_size=224, weights=tmp_path / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(timm_model.state_dict().values(), model.state_dict().values()))
    with pytest.raises(FileNotFoundError):
        weights.load_encoder(name, weights=tmp_path / "nope.pth")
    # a file of another architecture is refused in one line naming it, not loaded partly
    with pytest.raises(ValueError, match=r"hub.pth does not hold vit_small_patch16_dinov3.lvd1689m weights") as e:
        weights.load_encoder("vit_small_patch16_dinov3", img_size=256)  # the env var still names the DINOv2 file
    assert "\n" not in str(e.value)


def dinov3_release_state(model: torch.nn.Module) -> dict:
    """The original DINOv3 release's layout of a timm Eva DINOv3 (the inverse of timm's conversion)."""
    s = {k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma"): v
         for k, v in model.state_dict().items()}
    d = s["cls_token"].shape[-1]
    for i in range(len(model.blocks)):  # the release stores an all-zero qkv bias for the B/L/H models
        s[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * d)
    periods = torch.ones(d // model.blocks[0].attn.num_heads // 4)  # rotary frequencies: recomputed, not loaded
    return {**s, "mask_token": torch.zeros(1, d), "rope_embed.periods": periods}


def test_local_dinov3_release_file_loads(offline, tmp_path):
    name = "vit_small_patch16_dinov3.lvd1689m"
    ref = weights.build_encoder(name, img_size=256)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    torch.save(dinov3_release_state(ref), tmp_path / "dinov3_vits16_pretrain.pth")
    model = weights.load_encoder(name, img_size=256, weights=tmp_path / "dinov3_vits16_pretrain.pth")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert model.reglue_weights["name"] == name and not model.training
