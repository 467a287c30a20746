"""Compact encoding of DINOv2 tokens (the REPA target): 8 bits per value plus one scale per token.

Encoding "int8-hadamard" (chosen by measurement, bench/repa_encoding.py, BENCHMARKS.md):
rotate each token by a fixed orthogonal matrix R (randomised block Hadamard), then quantise it to
int8 with a per-token absmax scale. The rotation spreads DINOv2's few large channels over many
coordinates, so the absmax step is set by the token norm rather than by its largest channel; at
the same 8 bits it keeps mean cosine >= 0.9999 where plain per-token absmax int8 does not.
Decoding is `(q * scale) @ R^T` (R orthogonal). Torch only; any device.
"""

from __future__ import annotations

import functools

import torch

ENCODING = "int8-hadamard"
"""Name recorded in the cache metadata next to `patches` / `patches_scale`."""
QMAX = 127
SIGN_SEED = 0
"""Seed of the rotation's sign flips: part of the format, never change it for ENCODING."""


@functools.lru_cache(maxsize=8)
def _factors(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_b / sqrt(b) [b, b], signs [dim]) on CPU, b = largest power of two dividing dim.

    Sylvester Hadamard entries are +-1 and the signs come from a seeded CPU generator, so the
    rotation is the same on every machine and library build.
    """
    b = dim & -dim
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    g = torch.Generator().manual_seed(SIGN_SEED)
    signs = torch.randint(0, 2, (dim,), generator=g).float() * 2 - 1
    return h / b ** 0.5, signs


def _mix(x: torch.Tensor) -> torch.Tensor:
    """x @ kron(I_m, H_b) / sqrt(b): a Hadamard transform on each block of b channels; its own inverse."""
    h, _ = _factors(x.shape[-1])
    return (x.reshape(-1, h.shape[0]) @ h.to(x.device)).reshape(x.shape)


def rotation(dim: int) -> torch.Tensor:
    """The encoding's orthogonal [dim, dim] matrix R = diag(signs) kron(I, H_b) / sqrt(b) (float32)."""
    return _mix(torch.diag(_factors(dim)[1]))


def encode_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [..., D] -> (int8 [..., D], float16 scale [...]) with x ~= (q * scale) @ R^T."""
    signs = _factors(x.shape[-1])[1].to(x.device)
    y = _mix(x.float() * signs)                                            # x @ R
    # the scale is rounded to float16 first, so quantisation uses exactly the scale decode sees;
    # clamped to float16's smallest normal so an all-zero token does not divide by zero
    scale = (y.abs().amax(-1) / QMAX).clamp_min(2.0 ** -14).to(torch.float16)
    q = torch.round(y / scale.float()[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def decode_tokens(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(int8 [..., D], scale [...]) -> float32 tokens [..., D] on q's device."""
    y = q.float() * scale.to(q.device, torch.float32)[..., None]
    return _mix(y) * _factors(q.shape[-1])[1].to(q.device)                # y @ R^T
