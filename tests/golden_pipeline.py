"""Golden runners for the pipeline area (registered into `golden.RUNNERS`)."""

import hashlib
import re

import numpy as np
import torch
from golden import Case, make_input, runner
from PIL import Image

from reglue import weights
from reglue.pipeline.encoders import EncoderSpec, FeatureEncoder, preprocess_encoder
from reglue.pipeline.sources import center_crop

# hub DinoVisionTransformer kwarg -> timm VisionTransformer kwarg (same meaning)
HUB_TO_TIMM = {"patch_size": "patch_size", "embed_dim": "embed_dim", "depth": "depth",
               "num_heads": "num_heads", "mlp_ratio": "mlp_ratio", "init_values": "init_values",
               "num_register_tokens": "reg_tokens"}


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _sizes(text: str, call: str) -> tuple[int, int]:
    """The two integer arguments of `call(..., A, B)` in a case's description of its call."""
    found = re.search(re.escape(call) + r"\(.*?(\d+),\s*(\d+)\)", text)
    assert found, f"no {call}(..., size, size) in {text!r}"
    return int(found.group(1)), int(found.group(2))


@runner("center_crop")
def run_center_crop(case: Case):
    # dataset_tools.make_transform('center-crop-dhariwal', W, H) = partial(center_crop_imagenet, W): square W
    size, _ = _sizes(case.meta["call"], "make_transform")
    for spec in case.meta["inputs"]["images"]:
        k = spec["index"]
        image = make_input(case.tensors[f"in.grid_{k}"].numpy(), spec["width"], spec["height"])
        assert _sha256(image) == spec["input_sha256"], f"input {k} rebuilt wrongly"
        crop = center_crop(Image.fromarray(image), size)
        assert crop.dtype == np.uint8 and crop.shape == (size, size, 3)
        np.testing.assert_array_equal(crop, case.tensors[f"out.crop_{k}"].numpy(), err_msg=f"crop {k}")
        assert _sha256(crop) == spec["output_sha256"]


def _golden_dinov2(case: Case, spec: EncoderSpec) -> torch.nn.Module:
    """Our timm DINOv2 at the spec's input size, sized by case.json, with the case's hub-format weights loaded."""
    kw = case.meta["constructor"]["kwargs"]
    # the construction facts the timm stand-in relies on: the `_reg` hub backbones that train.py loads
    # (utils.py:64; hub backbones.py: antialiased pos-embed resampling, no offset, MLP FFN)
    assert kw["interpolate_antialias"] and kw["interpolate_offset"] == 0.0 and kw["ffn_layer"] == "mlp", kw
    dims = {HUB_TO_TIMM[k]: v for k, v in kw.items() if k in HUB_TO_TIMM}
    model = weights.build_encoder(img_size=spec.input_size, weight_init="skip", **dims)
    return weights.load_encoder_state(case.state(), model).eval()


@runner("dinov2_layers")
def run_dinov2_layers(case: Case):
    t, meta = case.tensors, case.meta
    width, height = _sizes(meta["inputs"]["images"], "make_input")
    assert width == height, "train.py's images are square ADM crops"
    images = [make_input(t[f"in.grid_{k}"].numpy(), width, height) for k in range(len(meta["inputs"]["image_sha256"]))]
    assert [_sha256(a) for a in images] == meta["inputs"]["image_sha256"]
    batch = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in images])  # uint8 [B,3,R,R]
    assert _sha256(batch.numpy()) == meta["inputs"]["batch_sha256"]

    layers = tuple(meta["layer_indices"])
    spec = EncoderSpec(preset="tiny", resolution=width, layers=layers, precision="fp32")
    model = _golden_dinov2(case, spec)
    enc = FeatureEncoder(spec, "cpu", vfm=model)
    out = enc.encode(batch, with_layers=True)
    x = preprocess_encoder(batch, spec)
    with torch.no_grad():  # the reference's exact call shape (reshape=True) for per-layer maps + CLS
        maps = model.get_intermediate_layers(x, n=list(layers), reshape=True,
                                             return_prefix_tokens=True, norm=True)
    B, g, D = batch.shape[0], spec.grid, model.embed_dim
    stride = x.shape[-1] // t["out.preprocessed_subsample"].shape[-1]  # the case's subsampling of the input
    ours = {
        "preprocessed_subsample": x[:, :, ::stride, ::stride],
        "concat": out["layers"].transpose(1, 2).reshape(B, len(layers) * D, g, g),
        "repa_target": torch.cat([out["cls"][:, None], out["patches"]], dim=1),
        "cls_token_new": out["cls"],
    }
    for n, (patch, prefix) in zip(layers, maps):
        ours[f"layer{n}.patch"], ours[f"layer{n}.cls"] = patch, prefix[:, 0]
    expected = {k[len("out."):]: v for k, v in t.items() if k.startswith("out.")}
    assert ours.keys() == expected.keys()
    for k, ref in expected.items():
        torch.testing.assert_close(ours[k], ref, **case.tol(), msg=lambda m, k=k: f"out.{k}: {m}")
    worst = {k: (ours[k] - expected[k]).abs().max().item() for k in expected}
    print(f"dinov2_layers max |ours - reference| per output: {worst}")
