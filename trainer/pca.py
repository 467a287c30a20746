"""ReDi's semantic channels: the last-layer DINOv2 patch tokens, standardized per channel and projected
onto their top principal components (ReDi `calc_pca.py` / `train_redi.py`: standardize, project to
rank 8, lay out on the 16 x 16 grid; the trainer then upsamples like the compressed features).

The PCA is fitted once per run on the cache's stored `patches` of `samples` images (whole chunks
evenly spread over the cache, so the fit reads contiguous runs) with float64 sums, and saved as
`RUN/pca.safetensors`; a resumed run loads that file instead of refitting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from reglue.pipeline.store import decode_patches
from reglue.trainer.data import PATCH_ARRAYS, read_rows


@dataclass(frozen=True)
class PCA:
    """x -> ((x - mean) / std) @ components.T, per token."""

    mean: torch.Tensor
    """(D,) float32 per-channel mean of the fitted tokens."""
    std: torch.Tensor
    """(D,) float32 per-channel population std."""
    components: torch.Tensor
    """(k, D) float32 unit principal directions of the standardized tokens, by decreasing variance."""

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, P, D) patch tokens -> (B, k, g, g) on the DINO grid (token p = row * g + col)."""
        B, P, _ = tokens.shape
        g = math.isqrt(P)
        dev = tokens.device
        x = (tokens.float() - self.mean.to(dev)) / self.std.to(dev)  # (B, P, D)
        return (x @ self.components.to(dev).T).transpose(1, 2).reshape(B, -1, g, g)  # (B, k, g, g)

    def save(self, path: str | Path) -> None:
        save_file({"mean": self.mean, "std": self.std, "components": self.components}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> PCA:
        return cls(**load_file(str(path)))


def pca_from_moments(total: torch.Tensor, outer: torch.Tensor, count: int, k: int) -> PCA:
    """The PCA from float64 sums of x and x x^T over `count` tokens."""
    mean = total / count  # (D,)
    cov = outer / count - torch.outer(mean, mean)  # (D, D) population covariance
    std = cov.diagonal().clamp_min(1e-12).sqrt()  # (D,)
    corr = cov / torch.outer(std, std)  # covariance of the standardized tokens
    _, vectors = torch.linalg.eigh(corr)  # ascending eigenvalues
    comps = vectors[:, -k:].flip(1).T  # (k, D), decreasing variance
    # eigh's sign is arbitrary: fix it (largest-magnitude entry positive) so a refit is identical.
    comps = comps * comps.gather(1, comps.abs().argmax(1, keepdim=True)).sign()
    return PCA(mean.float(), std.float(), comps.float().contiguous())


def fit_pca(cache, k: int, samples: int) -> PCA:
    """Fit on the decoded `patches` of about `samples` valid images, in whole chunks spread evenly."""
    D, C = cache.meta.dino_dim, cache.meta.chunk_size
    if not 0 < k <= D:
        raise ValueError(f"cannot keep {k} PCA components of {D}-dim tokens")
    valid = cache.valid_indices()
    chunks = np.unique(valid // C)
    picked = chunks[np.unique(np.linspace(0, len(chunks) - 1, max(1, -(-samples // C))).round().astype(int))]
    total, outer, count = torch.zeros(D, dtype=torch.float64), torch.zeros(D, D, dtype=torch.float64), 0
    for c in picked:
        rows = {name: torch.from_numpy(v) for name, v in
                read_rows(cache, PATCH_ARRAYS, valid[valid // C == c], C).items()}
        tokens = decode_patches(rows["patches"], rows["patches_scale"]).reshape(-1, D).double()  # (n P, D)
        total += tokens.sum(0)
        outer += tokens.T @ tokens
        count += tokens.shape[0]
    return pca_from_moments(total, outer, count, k)
