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
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_offline_dinov2_error_names_weights_source_and_fix(offline):
    t0 = time.perf_counter()
    with pytest.raises(weights.WeightsUnavailable) as e:
        weights.load_dinov2()
    msg = str(e.value)
    for part in ["vit_base_patch14_reg4_dinov2.lvd142m", "timm/vit_base_patch14_reg4_dinov2.lvd142m",
                 "dl.fbaipublicfiles.com/dinov2", "REGLUE_DINOV2_WEIGHTS", "HF_HUB_OFFLINE"]:
        assert part in msg
    assert time.perf_counter() - t0 < 10  # offline means no network retries


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
    at518 = weights.build_dinov2("vit_small_patch14_reg4_dinov2", img_size=518, weight_init="skip")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in at518.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    torch.save(hub_format_state(at518), tmp_path / "hub.pth")
    monkeypatch.setenv(weights.DINOV2_WEIGHTS_ENV, str(tmp_path / "hub.pth"))
    model = weights.load_dinov2(name, img_size=224)
    assert model.pos_embed.shape == (1, 16 * 16, 384) and model.reglue_weights["source"].endswith("hub.pth")
    assert torch.equal(model.cls_token, at518.cls_token) and torch.equal(model.reg_token, at518.reg_token)
    assert torch.equal(model.blocks[3].attn.qkv.weight, at518.blocks[3].attn.qkv.weight)
    # the timm layout (what the HF Hub `timm/` repo serves) loads to the same model
    from safetensors.torch import save_file
    save_file(at518.state_dict(), str(tmp_path / "model.safetensors"))
    timm_model = weights.load_dinov2(name, img_size=224, weights=tmp_path / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(timm_model.state_dict().values(), model.state_dict().values()))
    with pytest.raises(FileNotFoundError):
        weights.load_dinov2(name, weights=tmp_path / "nope.pth")
