"""ReDi's semantic channels: the last-layer DINOv2 patch tokens, standardized per channel, centred and
projected onto their top principal components, laid out on the 16 x 16 grid (ReDi train_redi.py:276-311;
the trainer then upsamples them like the compressed features).

Two sources, both saved once per run as `RUN/pca.safetensors` (a resumed run loads that file):
- ReDi's own released file (`pcs/dino_pca_model.pth`, `--pca-file`): `torch.save({'pca_model': sklearn
  PCA, 'mean', 'std'})` (calc_pca.py:173-179), read with `weights_only=True` and an allow-list in which
  a plain attribute bag stands in for sklearn's PCA class: no sklearn (nor any other) code runs.
- A fit on the cache as calc_pca.py fits it: the first `samples` images in the source's sorted order
  (calc_pca.py:131-156: `shuffle=False`, batches of 256 until `c > 300`, i.e. 302 x 256 = 77,312), their
  patch tokens standardized per channel with the population std, then the principal directions of the
  standardized tokens (sklearn `PCA(768)`, calc_pca.py:161-171). Here from float64 moments and `eigh`,
  with sklearn's sign rule (each component's largest-magnitude entry positive). ReDi's fp32 statistics
  drift over 79M rows: its released file's `pca_model.mean_` (the mean of tokens it had standardized)
  reaches 0.55 where exact arithmetic gives 0; ours is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from reglue.pipeline.compressor import NORM_STATS_GLOBALS, safe_load
from reglue.pipeline.store import decode_patches
from reglue.trainer.data import PATCH_ARRAYS, read_rows

REDI_PCA_SAMPLES = 302 * 256
"""Images calc_pca.py fits on with its defaults (77,312). ReDi's released file says n_samples_ = 79,167,488
tokens = 309,248 images (302 x 1024), so it was fitted with a global batch of 1024."""


class SklearnPCAFields:
    """Stands in for `sklearn.decomposition._pca.PCA` while reading ReDi's file: an attribute bag (the
    unpickler sets its state; no method of sklearn's class exists or runs)."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


REDI_FILE_GLOBALS = (*NORM_STATS_GLOBALS, np.dtypes.Float64DType, (SklearnPCAFields, "sklearn.decomposition._pca.PCA"),
                     (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"))
"""What ReDi's pcs/dino_pca_model.pth pickles: numpy arrays (written with NumPy < 2 names) and sklearn's PCA."""


@dataclass(frozen=True)
class PCA:
    """x -> ((x - mean) / std - center) @ components.T, per token."""

    mean: torch.Tensor
    """(D,) float32 per-channel mean of the fitted tokens."""
    std: torch.Tensor
    """(D,) float32 per-channel population std."""
    components: torch.Tensor
    """(k, D) float32 unit principal directions of the standardized tokens, by decreasing variance."""
    center: torch.Tensor | None = None
    """(D,) float32 mean of the standardized tokens, subtracted before projecting (sklearn's `mean_`,
    train_redi.py:307); zeros for a fit here."""

    def __post_init__(self):
        if self.center is None:
            object.__setattr__(self, "center", torch.zeros_like(self.mean))
        D = self.mean.shape[0]
        if self.std.shape != (D,) or self.center.shape != (D,) or self.components.ndim != 2 or \
                self.components.shape[1] != D:
            raise ValueError(f"inconsistent PCA shapes: mean {tuple(self.mean.shape)}, std {tuple(self.std.shape)}, "
                             f"center {tuple(self.center.shape)}, components {tuple(self.components.shape)}")

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, P, D) patch tokens -> (B, k, g, g) on the DINO grid (token p = row * g + col)."""
        B, P, _ = tokens.shape
        g = math.isqrt(P)
        dev = tokens.device
        x = (tokens.float() - self.mean.to(dev)) / self.std.to(dev) - self.center.to(dev)  # (B, P, D)
        return (x @ self.components.to(dev).T).transpose(1, 2).reshape(B, -1, g, g)  # (B, k, g, g)

    def save(self, path: str | Path) -> None:
        save_file({"mean": self.mean, "std": self.std, "components": self.components, "center": self.center},
                  str(path))

    @classmethod
    def load(cls, path: str | Path) -> PCA:
        return cls(**load_file(str(path)))  # files written before `center` existed load with zeros


def load_pca_file(path: str | Path, k: int) -> PCA:
    """The first `k` components of a PCA file: ReDi's `dino_pca_model.pth` or a reglue `pca.safetensors`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        pca = PCA.load(path)
        if pca.components.shape[0] < k:
            raise ValueError(f"{path} holds {pca.components.shape[0]} PCA components; the method keeps {k}")
        return PCA(pca.mean, pca.std, pca.components[:k].contiguous(), pca.center)
    d = safe_load(path, REDI_FILE_GLOBALS, hint="Pass ReDi's pcs/dino_pca_model.pth or a reglue pca.safetensors.")
    model = d.get("pca_model") if isinstance(d, dict) else None
    if not isinstance(model, SklearnPCAFields) or not {"components_", "mean_"} <= vars(model).keys() \
            or not {"mean", "std"} <= d.keys():
        raise ValueError(f"{path} is not ReDi's PCA file ({{'pca_model': sklearn PCA, 'mean', 'std'}}, "
                         "calc_pca.py:173-179) nor a reglue pca.safetensors")
    comps = torch.from_numpy(np.asarray(model.components_, np.float32))
    if comps.shape[0] < k:
        raise ValueError(f"{path} holds {comps.shape[0]} PCA components; the method keeps {k}")
    as_tensor = lambda a: torch.from_numpy(np.asarray(a, np.float32).copy())
    return PCA(as_tensor(d["mean"]), as_tensor(d["std"]), comps[:k].contiguous(), as_tensor(model.mean_))


def pca_from_moments(total: torch.Tensor, outer: torch.Tensor, count: int, k: int) -> PCA:
    """The PCA from float64 sums of x and x x^T over `count` tokens."""
    mean = total / count  # (D,)
    cov = outer / count - torch.outer(mean, mean)  # (D, D) population covariance
    std = cov.diagonal().clamp_min(1e-12).sqrt()  # (D,)
    corr = cov / torch.outer(std, std)  # covariance of the standardized tokens
    _, vectors = torch.linalg.eigh(corr)  # ascending eigenvalues
    comps = vectors[:, -k:].flip(1).T  # (k, D), decreasing variance
    # eigh's sign is arbitrary: fix it as sklearn's svd_flip does (largest-magnitude entry positive), so a
    # refit is identical and the channels have ReDi's signs.
    comps = comps * comps.gather(1, comps.abs().argmax(1, keepdim=True)).sign()
    return PCA(mean.float(), std.float(), comps.float().contiguous())


def fit_pca(cache, k: int, samples: int = REDI_PCA_SAMPLES, device: torch.device | str = "cpu") -> PCA:
    """Fit on the decoded `patches` of the first `samples` valid images in store (= sorted source) order.

    The decode and the float64 sums run on `device`: at 77,312 images that is ~1.2e13 flops of each,
    ~1 h on 2 CPU cores (2.8 s per 64 images measured), seconds on a GPU."""
    D, C = cache.meta.dino_dim, cache.meta.chunk_size
    if not 0 < k <= D:
        raise ValueError(f"cannot keep {k} PCA components of {D}-dim tokens")
    rows = cache.valid_indices()[:samples]
    total, outer, count = (torch.zeros(D, dtype=torch.float64, device=device),
                           torch.zeros(D, D, dtype=torch.float64, device=device), 0)
    for c in np.unique(rows // C):
        stored = {n: torch.from_numpy(v).to(device) for n, v in
                  read_rows(cache, PATCH_ARRAYS, rows[rows // C == c], C).items()}
        tokens = decode_patches(stored["patches"], stored["patches_scale"]).reshape(-1, D).double()  # (n P, D)
        total += tokens.sum(0)
        outer += tokens.T @ tokens
        count += tokens.shape[0]
    return pca_from_moments(total.cpu(), outer.cpu(), count, k)
