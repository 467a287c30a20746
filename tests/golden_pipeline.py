"""Golden runners for the pipeline area (registered into `golden.RUNNERS`)."""

import hashlib

import numpy as np
import torch
from golden import Case, make_input, runner
from PIL import Image

from reglue import weights
from reglue.pipeline.encoders import EncoderSpec, FeatureEncoder, preprocess_dino
from reglue.pipeline.sources import center_crop

# hub DinoVisionTransformer kwarg -> timm VisionTransformer kwarg (same meaning)
HUB_TO_TIMM = {"patch_size": "patch_size", "embed_dim": "embed_dim", "depth": "depth",
               "num_heads": "num_heads", "mlp_ratio": "mlp_ratio", "init_values": "init_values",
               "num_register_tokens": "reg_tokens"}


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@runner("center_crop")
def run_center_crop(case: Case):
    for spec in case.meta["inputs"]["images"]:
        k = spec["index"]
        image = make_input(case.tensors[f"in.grid_{k}"].numpy(), spec["width"], spec["height"])
        assert _sha256(image) == spec["input_sha256"], f"input {k} rebuilt wrongly"
        crop = center_crop(Image.fromarray(image), 256)
        assert crop.dtype == np.uint8 and crop.shape == (256, 256, 3)
        np.testing.assert_array_equal(crop, case.tensors[f"out.crop_{k}"].numpy(), err_msg=f"crop {k}")
        assert _sha256(crop) == spec["output_sha256"]


def _golden_dinov2(case: Case) -> torch.nn.Module:
    """Our timm DINOv2 at 224, sized by case.json, with the case's hub-format weights loaded."""
    kw = case.meta["constructor"]["kwargs"]
    # the construction facts the timm stand-in relies on (dinov2_vitb14_reg, hub backbones.py)
    assert kw["interpolate_antialias"] and kw["interpolate_offset"] == 0.0 and kw["ffn_layer"] == "mlp"
    dims = {HUB_TO_TIMM[k]: v for k, v in kw.items() if k in HUB_TO_TIMM}
    model = weights.build_dinov2(img_size=EncoderSpec(resolution=256).dino_size, weight_init="skip", **dims)
    return weights.load_dinov2_hub_state(case.state(), model).eval()


@runner("dinov2_layers")
def run_dinov2_layers(case: Case):
    t, meta = case.tensors, case.meta
    images = [make_input(t[f"in.grid_{k}"].numpy(), 256, 256) for k in (0, 1)]
    assert [_sha256(a) for a in images] == meta["inputs"]["image_sha256"]
    batch = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in images])  # uint8 [B,3,256,256]
    assert _sha256(batch.numpy()) == meta["inputs"]["batch_sha256"]

    layers = tuple(meta["layer_indices"])
    spec = EncoderSpec(preset="tiny", resolution=256, layers=layers, precision="fp32")
    model = _golden_dinov2(case)
    enc = FeatureEncoder(spec, "cpu", dino=model)
    out = enc.encode(batch, with_layers=True)
    x = preprocess_dino(batch, spec.dino_size)
    with torch.no_grad():  # the reference's exact call shape (reshape=True) for per-layer maps + CLS
        maps = model.get_intermediate_layers(x, n=list(layers), reshape=True,
                                             return_prefix_tokens=True, norm=True)
    B, g, D = batch.shape[0], spec.grid, model.embed_dim
    ours = {
        "preprocessed_subsample": x[:, :, ::16, ::16],
        "concat": out["layers"].transpose(1, 2).reshape(B, len(layers) * D, g, g),
        "repa_target": torch.cat([out["cls"][:, None], out["patches"]], dim=1),
        "cls_token_new": out["cls"],
    }
    for n, (patch, prefix) in zip(layers, maps):
        ours[f"layer{n}.patch"], ours[f"layer{n}.cls"] = patch, prefix[:, 0]
    expected = {k[len("out."):]: v for k, v in t.items() if k.startswith("out.")}
    assert ours.keys() == expected.keys()
    worst = {k: (ours[k] - expected[k]).abs().max().item() for k in expected}
    print(f"dinov2_layers max |ours - reference| per output: {worst}")
    for k, ref in expected.items():
        torch.testing.assert_close(ours[k], ref, **case.tol(), msg=lambda m, k=k: f"out.{k}: {m}")
