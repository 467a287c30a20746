"""The ADM evaluator's Inception-v3, in PyTorch.

ADM (guided-diffusion `evaluations/evaluator.py`) runs the TensorFlow graph of the 2015-12-05
Inception. NVIDIA's TorchScript translation of that graph, `inception-2015-12-05.pt`, is what
clean-fid's `legacy_tensorflow` mode loads; its FID agrees with TF to ~3e-6 relative (clean-fid
docs/tensorflow_fid.md). We load it through the same clean-fid wrapper (`InceptionV3W` with
`resize_inside=True`, exactly what `build_feature_extractor("legacy_tensorflow")` builds), but
from a configurable path: clean-fid itself hard-codes a file in the system temp folder and downloads
without a checksum or an atomic write.

Outputs, all float32:
- `pool`   [B, 2048]: `pool_3`, for FID and precision/recall (the network's own forward);
- `probs`  [B, 1008]: softmax(pool @ W) without the output bias, ADM's Inception-Score head;
- `spatial`[B, 2023]: ADM's sFID features `mixed_6/conv[..., :7]` flattened in NHWC order. The
  TorchScript has no output for this layer, so `pool_and_spatial` runs its input stage and layers
  one by one (one pass gives both outputs); on the first batch that pass's `pool_3` is checked
  against the network's own forward, and sFID is refused if they differ.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 + INCEPTION_FILE)
INCEPTION_ENV = "REGLUE_INCEPTION_WEIGHTS"
SPATIAL_CHANNELS = 7  # ADM evaluator.py: spatial[..., :7]


def inception_file(path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Where `inception-2015-12-05.pt` is: `path` (the file or its folder), else `$REGLUE_INCEPTION_WEIGHTS`,
    else reglue's cache folder, where it is downloaded (atomically) when missing and `download`."""
    from reglue.weights import find_file

    file = find_file(INCEPTION_FILE, INCEPTION_URL, given=path, env=INCEPTION_ENV, option="--inception",
                     what="Inception weights (NVIDIA's TorchScript of the ADM evaluator's TF Inception)",
                     download=download)
    if file.name != INCEPTION_FILE:  # clean-fid's InceptionV3W takes a folder and this name
        raise ValueError(f"{file}: the Inception TorchScript must be named {INCEPTION_FILE}")
    return file


def tf1_resize_normalize(images: torch.Tensor) -> torch.Tensor:
    """The TorchScript's input stage (NVIDIA's comment: emulate tf.image.resize_bilinear to 299 "including
    the funky alignment"): affine_grid + grid_sample with a half-pixel shift, then (x - 128) / 128."""
    x = images.to(torch.float32)
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
    grid = F.affine_grid(theta.unsqueeze(0).repeat(b, 1, 1), [b, c, 299, 299], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128) / 128


class Inception:
    """NVIDIA's TorchScript Inception (clean-fid `legacy_tensorflow`), on uint8 NCHW images."""

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 download: bool = True):
        from cleanfid.inception_torchscript import InceptionV3W

        self.file = file = inception_file(path, download)
        self.device = torch.device(device)
        with warnings.catch_warnings():  # torch deprecates TorchScript; the published file is one
            warnings.simplefilter("ignore", FutureWarning)
            self.net = InceptionV3W(str(file.parent), download=False, resize_inside=True).to(self.device)
        self.base = self.net.base  # the TorchScript: forward(img, return_features, ..., no_output_bias)
        self.spatial_checked = False

    @torch.no_grad()
    def pool(self, images: torch.Tensor) -> torch.Tensor:
        """pool_3 [B,2048] from uint8 (or 0..255 float) [B,3,H,W]; the TorchScript resizes to 299."""
        return self.net(images.to(self.device)).float()

    @torch.no_grad()
    def probs(self, pool: torch.Tensor) -> torch.Tensor:
        """ADM's IS head: softmax(pool_3 @ W) with no bias (evaluator.py `_create_softmax_graph`)."""
        logits = F.linear(pool.to(self.device).float(), self.base.output.weight)
        return torch.softmax(logits, dim=1)

    @torch.no_grad()
    def pool_and_spatial(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pool_3 [B,2048] and ADM's sFID features [B,2023] (mixed_6/conv post-ReLU, channels 0..6,
        flattened (h, w, c)) from one pass of the network's layers, run here one by one."""
        x = tf1_resize_normalize(images.to(self.device))
        for name, layer in self.base.layers.named_children():
            if name == "mixed_6":
                tap = layer.conv(x)[:, :SPATIAL_CHANNELS]
                spatial = tap.permute(0, 2, 3, 1).reshape(len(tap), -1).float()
            x = layer(x)
        pool = x.reshape(-1, 2048).float()
        if not self.spatial_checked:
            self._check_replica(images, pool)
        return pool, spatial

    def _check_replica(self, images: torch.Tensor, ours: torch.Tensor) -> None:
        theirs = self.pool(images)
        err = (ours - theirs).abs().max().item() / max(theirs.abs().max().item(), 1e-12)
        if err > 1e-5:
            raise ValueError(f"sFID refused: running this Inception's layers one by one differs from its "
                             f"own forward by {err:.2e} (relative), so mixed_6 would not be ADM's; "
                             "turn sFID off (--no-sfid)")
        self.spatial_checked = True


# ---- a random-weight stand-in (tests and demos only) ---------------------------------------------

class _TorchScriptInception(torch.nn.Module):
    """NVIDIA's TorchScript interface and preprocessing around the FID Inception architecture
    (`layers` named after the TF graph: mixed_6 is torchvision's Mixed_6d, `output` the 1008-way head)."""

    def __init__(self, layers: torch.nn.Sequential, output: torch.nn.Linear):
        super().__init__()
        self.layers, self.output = layers, output

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        features = self.layers(tf1_resize_normalize(img)).reshape(-1, 2048)
        if return_features:
            return features
        logits = F.linear(features, self.output.weight) if no_output_bias else self.output(features)
        return torch.softmax(logits, dim=1)


def save_standin(path: str | os.PathLike, seed: int = 0) -> Path:
    """Script and save a random-weight Inception with the real file's architecture and interface
    (clean-fid's `fid_inception_v3` blocks, NVIDIA's forward) as `path`. NOT for real use: it lets
    the whole `reglue fid` path run offline in tests and demos."""
    import torchvision
    from cleanfid import inception_pytorch as fid

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # The block swap of clean-fid `fid_inception_v3`, minus its weight download.
        net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = (fid.FIDInceptionA(192, 32), fid.FIDInceptionA(256, 64),
                                                    fid.FIDInceptionA(288, 64))
        net.Mixed_6b, net.Mixed_6c = fid.FIDInceptionC(768, 128), fid.FIDInceptionC(768, 160)
        net.Mixed_6d, net.Mixed_6e = fid.FIDInceptionC(768, 160), fid.FIDInceptionC(768, 192)
        net.Mixed_7b, net.Mixed_7c = fid.FIDInceptionE_1(1280), fid.FIDInceptionE_2(2048)
        net.Mixed_6d.conv = net.Mixed_6d.branch1x1  # TF's mixed_6/conv
        for m in net.modules():  # He init keeps random activations O(1) through the 94 convolutions
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        names = ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed"]
        names += [f"mixed_{i}" for i in range(1, 11)]
        blocks = [net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, torch.nn.MaxPool2d(3, 2),
                  net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, torch.nn.MaxPool2d(3, 2), net.Mixed_5b, net.Mixed_5c,
                  net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e,
                  net.Mixed_7a, net.Mixed_7b, net.Mixed_7c]
        layers = torch.nn.Sequential(OrderedDict(zip(names + ["pool2"], blocks + [torch.nn.AvgPool2d(8)])))
        model = _TorchScriptInception(layers, net.fc).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(model), str(path))
    return path
