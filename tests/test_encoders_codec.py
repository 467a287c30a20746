"""The REPA-target token codec: format, fidelity (mean cosine >= 0.9999), robustness to outliers."""

import pytest
import torch
import torch.nn.functional as F

from reglue.pipeline import codec


def tokens(n=4096, d=768, kind="gaussian", seed=0):
    """Normed-ViT-like tokens: per-channel means and scales spread like DINOv2-B's layer 11."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g) * 0.4
    std = 0.5 + torch.rand(d, generator=g) * 2.5
    z = torch.randn(n, d, generator=g)
    if kind == "heavy":     # Student-t-like tails: Gaussian scaled by a random per-element factor
        z = z * torch.randn(n, d, generator=g).abs().clamp_min(0.05) ** -0.35 * 0.7
    if kind == "outliers":  # a few channels 20x larger than the rest
        std[:4] = 20 * std.max()
    return mean + std * z


@pytest.mark.parametrize("d", [32, 384, 768, 1024])
def test_rotation_is_orthogonal_and_fixed(d):
    r = codec.rotation(d)
    torch.testing.assert_close(r @ r.T, torch.eye(d), atol=1e-6, rtol=0)
    assert torch.equal(r, codec.rotation(d))
    assert (r.abs() > 0).float().mean() > 0.3   # it mixes channels, not a permutation


@pytest.mark.parametrize("kind", ["gaussian", "heavy", "outliers"])
def test_fidelity(kind):
    x = tokens(kind=kind)
    q, scale = codec.encode_tokens(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dtype == torch.float16 and scale.shape == x.shape[:-1]
    assert (q.abs().amax(-1) >= 126).all()         # the full int8 range is used for every token
    y = codec.decode_tokens(q, scale)
    cos = F.cosine_similarity(y, x, dim=-1)
    assert y.dtype == torch.float32
    assert cos.mean() >= 0.9999 and cos.min() >= 0.9997, (cos.mean().item(), cos.min().item())
    # plain per-token absmax int8 (no rotation) misses the target on outlier channels
    if kind == "outliers":
        s = (x.abs().amax(-1, keepdim=True) / 127).half().float()
        plain = F.cosine_similarity(torch.round(x / s) * s, x, dim=-1)
        assert plain.mean() < 0.9999 < cos.mean()


def test_deterministic_batched_and_edge_cases():
    x = tokens(n=64).view(2, 32, 768)                # [B, P, D] as stored
    q, s = codec.encode_tokens(x)
    q1, s1 = codec.encode_tokens(x[1])
    assert torch.equal(q[1], q1) and torch.equal(s[1], s1)
    assert torch.equal(codec.decode_tokens(q, s)[1], codec.decode_tokens(q1, s1))
    zero_q, zero_s = codec.encode_tokens(torch.zeros(3, 768))
    assert torch.equal(codec.decode_tokens(zero_q, zero_s), torch.zeros(3, 768))
    q16, s16 = codec.encode_tokens(x.half())         # any float input; decode is float32
    assert F.cosine_similarity(codec.decode_tokens(q16, s16), x.float(), dim=-1).min() > 0.9997
