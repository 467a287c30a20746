"""The training objective: five methods behind one switch, and the loss terms of one step.

Exactly the reference's loss (loss.py, train.py:348-358; reference-implementation.md §5): the linear
interpolant x_t = (1 - t) x + t eps (t=0 data, t=1 noise), v-prediction with target eps - x, one
uniform t per sample shared by the latent, the feature channels and the CLS token, and

    loss = MSE(latent) + lam * MSE(features) + w_proj * REPA + w_cls * MSE(CLS)

where each MSE is a per-sample mean over its own elements, averaged over the batch, and REPA is the
negative cosine between the projector output and the DINOv2 target, averaged over batch and tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from reglue.trainer.draws import RANDOM, Draws
from reglue.trainer.models import SiT

FeatureKind = Literal["none", "compressed", "pca"]

# The reference's hidden rule for SiT-XL (train.py:349-354, not in the paper or README): lam x0.5
# from step 250K and x0.25 from 500K. Pass it as `lam_schedule` to reproduce the XL run; it is
# never inferred from the model's name.
XL_LAM_SCHEDULE: tuple[tuple[int, float], ...] = ((0, 1.0), (250_000, 0.5), (500_000, 0.25))


def reference_lam_schedule(model: str, lam: float = 1.0) -> tuple[tuple[int, float], ...]:
    """The lambda a reference run of SiT preset `model` with `--lam lam` trains with (train.py:349-354):
    lam, and, when "XL" is in the model name, lam x0.5 from step 250K and x0.25 from 500K."""
    return tuple((s, lam * v) for s, v in (XL_LAM_SCHEDULE if "XL" in model else ((0, 1.0),)))


@dataclass(frozen=True)
class Method:
    """Which inputs a SiT sees and which loss terms train it."""

    name: str
    """Preset name, recorded with checkpoints."""
    features: FeatureKind = "none"
    """Semantic channels concatenated to the VAE latent: 'compressed' (REGLUE: compressor output of
    the normed multi-layer patch tokens), 'pca' (ReDi: PCA of the last-layer patch tokens, fitted
    on the cache) or 'none'. Both kinds are upsampled bilinearly from the DINO grid to the latent's."""
    feature_channels: int = 0
    """Channels of those features: compressor output channels (REGLUE 16; paper T6 ablates 4/8/16/20)
    or PCA components (ReDi 8). 0 iff features == 'none'."""
    layers: tuple[int, ...] = (8, 9, 10, 11)
    """0-based DINOv2 blocks whose normed patch tokens feed the compressor (paper T5; 'last' = (11,)).
    Must be cached; only used when features == 'compressed'."""
    compressor_hidden: int = 256
    """Hidden width of the compressor (paper: 128 / 256 / 512 give FID 14.2 / 13.3 / 13.3)."""
    cls: bool = False
    """Denoise the DINOv2 [CLS] token as an extra SiT token (REG)."""
    repa: bool = False
    """Align the projector output after block `encoder_depth` with DINOv2 tokens (REPA)."""
    lam_schedule: tuple[tuple[int, float], ...] = ((0, 1.0),)
    """Feature-loss weight lambda as (first step, value) pairs, steps increasing from 0."""
    w_cls: float = 0.03
    """Weight of the CLS MSE (train.py `--cls 0.03`)."""
    w_proj: float = 0.5
    """Weight of the REPA term (train.py `--proj-coeff 0.5`)."""
    path: Literal["linear", "cosine"] = "linear"
    """Interpolant (train.py `--path-type`, loss.py:36-50): linear (alpha = 1 - t, sigma = t; every
    paper's) or cosine (alpha = cos(pi t / 2), sigma = sin(pi t / 2)). The sampler follows it."""
    weighting: Literal["uniform", "lognormal"] = "uniform"
    """Time sampling (train.py `--weighting`, loss.py:57-67): t ~ U[0, 1) (every paper's), or EDM's
    lognormal sigma = exp(N(0, 1)) mapped to t by the path."""
    dino_drop_prob: float = 0.0
    """ReDi's representation dropout (`--dino-drop-prob`, off by default; transport.py:134-137): with this
    probability a micro-batch's semantic channels are zeroed and their loss weight set to 0."""
    vae_cfg_rule: Literal["reglue", "redi"] = "reglue"
    """How sampling with `vae_cfg` guides this model's latent channels (trainer.sampling): 'reglue' (the
    reference's c + s(c - u), SDE loop steps only) or 'redi' (ReDi's u + s(c - u), every step;
    models.py:309-327)."""

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "lam_schedule", tuple((int(s), float(v)) for s, v in self.lam_schedule))
        if self.features not in ("none", "compressed", "pca"):
            raise ValueError(f"features must be 'none', 'compressed' or 'pca'; got {self.features!r}")
        if (self.features == "none") != (self.feature_channels == 0) or self.feature_channels < 0:
            raise ValueError(f"feature_channels must be > 0 with features={self.features!r} and 0 without; "
                             f"got {self.feature_channels}")
        steps = [s for s, _ in self.lam_schedule]
        if not steps or steps[0] != 0 or steps != sorted(set(steps)):
            raise ValueError(f"lam_schedule must start at step 0 with increasing steps; got {self.lam_schedule}")
        if not self.layers:
            raise ValueError("layers must name at least one DINOv2 block")
        if self.path not in ("linear", "cosine") or self.weighting not in ("uniform", "lognormal"):
            raise ValueError(f"path must be linear|cosine and weighting uniform|lognormal (loss.py:36-67); "
                             f"got {self.path!r}, {self.weighting!r}")
        if not 0 <= self.dino_drop_prob < 1 or (self.dino_drop_prob and self.features == "none"):
            raise ValueError(f"dino_drop_prob must be in [0, 1) and needs semantic channels; got {self.dino_drop_prob} "
                             f"with features={self.features!r}")
        if self.vae_cfg_rule not in ("reglue", "redi"):
            raise ValueError(f"vae_cfg_rule must be 'reglue' or 'redi'; got {self.vae_cfg_rule!r}")

    @classmethod
    def from_dict(cls, d: dict) -> Method:
        """A Method saved as a dict (snapshots); fields it predates take its preset's values, by name."""
        base = METHODS.get(d.get("name"))
        return replace(base, **d) if base is not None else cls(**d)

    @property
    def uses_dino(self) -> bool:
        """Whether any input or target comes from DINOv2 (semantic channels, CLS token, REPA target)."""
        return self.features != "none" or self.cls or self.repa

    def lam(self, step: int) -> float:
        """lambda in effect at optimizer step `step` (0-based count of steps already taken)."""
        return [v for s, v in self.lam_schedule if s <= step][-1]

    def compressor_channel_list(self, dino_dim: int) -> list[int]:
        """`build_channel_list` of the compressor this method trains and uses (e.g. [3072, 256, 16])."""
        return [len(self.layers) * dino_dim, self.compressor_hidden, self.feature_channels]


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sit"),  # latents only (SiT)
    Method("repa", repa=True),  # + alignment of block encoder_depth with DINOv2 (REPA)
    Method("reg", cls=True, repa=True),  # + the noisy [CLS] token entangled (REG)
    Method("redi", features="pca", feature_channels=8, vae_cfg_rule="redi"),  # + PCA-8 patch features (ReDi)
    Method("reglue", features="compressed", feature_channels=16, cls=True, repa=True),  # REGLUE
)}


def get_method(name: str, **overrides) -> Method:
    """A preset, with ablation knobs overridden (e.g. `get_method('reglue', repa=False)`)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return replace(METHODS[name], **overrides)


def sit_io(method: Method, *, latent_channels: int, latent_size: int, dino_dim: int,
           compressed_channels: int = 0) -> dict:
    """The SiT kwargs a method implies for a cache: input size and channels, CLS width, REPA dims.

    `compressed_channels` is the cache's (0 when it holds none); it must match the method's."""
    if method.features == "compressed" and compressed_channels != method.feature_channels:
        raise ValueError(f"method {method.name!r} needs {method.feature_channels} compressed channels but the "
                         f"cache has {compressed_channels}; fill the cache's compressed features with a "
                         "compressor of that width, or set feature_channels to match")
    return dict(input_size=latent_size, in_channels=latent_channels + method.feature_channels,
                cls_dim=dino_dim if method.cls else None, z_dims=(dino_dim,) if method.repa else ())


@dataclass(kw_only=True)
class Batch:
    """One training batch, already on the device and in the model's units."""

    latent: torch.Tensor
    """(B, zc, h, h) VAE posterior sample times the scaling factor (0.18215)."""
    labels: torch.Tensor
    """(B,) int64 class ids; the null id num_classes means unconditional."""
    features: torch.Tensor | None = None
    """(B, c, h, h) semantic channels already upsampled to the latent grid, or None."""
    cls: torch.Tensor | None = None
    """(B, D) DINOv2 last-layer [CLS] after the final norm, or None."""
    repa_target: torch.Tensor | None = None
    """(B, S, D) REPA target: [CLS; last-layer patches] (S = 1 + P) with a CLS token, else patches."""


def interpolant(t: torch.Tensor, path: str):
    """(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt) of the path at t, as loss.py:36-50 writes them
    (the linear path's derivatives are the numbers -1 and 1)."""
    if path == "linear":
        return 1 - t, t, -1, 1
    half_pi = t * math.pi / 2
    return torch.cos(half_pi), torch.sin(half_pi), -math.pi / 2 * torch.sin(half_pi), math.pi / 2 * torch.cos(half_pi)


def draw_time(x: torch.Tensor, method: Method, draws: Draws = RANDOM) -> torch.Tensor:
    """(B, 1, 1, 1) times drawn on the CPU, moved to x's device and dtype (loss.py:57-69)."""
    shape = (x.shape[0], 1, 1, 1)
    if method.weighting == "uniform":
        t = draws.time(shape)
    else:  # EDM's lognormal sigma, mapped to the path's t (loss.py:60-67)
        sigma = draws.time_normal(shape).exp()
        t = sigma / (1 + sigma) if method.path == "linear" else 2 / math.pi * torch.atan(sigma)
    return t.to(device=x.device, dtype=x.dtype)


def _joint(batch: Batch) -> torch.Tensor:
    if batch.features is None:
        return batch.latent
    return torch.cat([batch.latent, batch.features], dim=1)  # (B, zc + c, h, h), train.py:340


def per_sample_losses(model: SiT, batch: Batch, method: Method,
                      draws: Draws = RANDOM) -> dict[str, torch.Tensor | None]:
    """Unweighted terms: 'latent', 'feature', 'cls' per sample (B,), 'proj' a scalar (None if absent), and
    'dropped': whether ReDi's representation dropout hit this micro-batch.

    Draws t, the noise, the CLS noise and (in train() mode, inside the model) the label dropout from
    `draws`, in the reference's order (loss.py:57-86, sit.py:88)."""
    x = _joint(batch)  # (B, C, h, h)
    t = draw_time(x, method, draws)  # (B, 1, 1, 1)
    noise = draws.noise(x)  # (B, C, h, h)
    noise_cls = draws.noise_cls(batch.cls) if batch.cls is not None else None  # (B, D)
    dropped = bool(method.dino_drop_prob) and draws.representation_drop() < method.dino_drop_prob
    if dropped:  # ReDi's representation dropout (transport.py:133-136): clean semantic channels zeroed
        x = torch.cat([batch.latent, torch.zeros_like(batch.features)], dim=1)
    alpha, sigma, d_alpha, d_sigma = interpolant(t, method.path)
    x_t = alpha * x + sigma * noise  # (B, C, h, h)
    v = d_alpha * x + d_sigma * noise  # d/dt x_t: the v-target (linear: noise - x)
    cls_t = None
    if batch.cls is not None:
        cls_t = alpha.flatten(1) * batch.cls + sigma.flatten(1) * noise_cls  # (B, D)
    v_hat, zs, cls_hat = model(x_t, t.flatten(), batch.labels, cls_token=cls_t, draws=draws)
    err = (v_hat - v) ** 2  # (B, C, h, h)
    zc = batch.latent.shape[1]
    out: dict[str, torch.Tensor | None] = {"latent": err[:, :zc].mean(dim=(1, 2, 3)), "feature": None,
                                           "cls": None, "proj": None, "dropped": dropped}
    if batch.features is not None:
        out["feature"] = err[:, zc:].mean(dim=(1, 2, 3))
    if batch.cls is not None:
        # loss.py:81 as written: on the cosine path its (B, 1, 1, 1) d_alpha broadcasts against the (B, D)
        # token into a (B, 1, B, D) target (each prediction against every sample's target); reproduced,
        # as the reference trains it. The linear path's numbers keep it (B, D).
        cls_v = d_alpha * batch.cls + d_sigma * noise_cls
        cls_err = (cls_hat - cls_v) ** 2
        out["cls"] = cls_err.mean(dim=tuple(range(1, cls_err.dim())))  # (B,), mean_flat
    if batch.repa_target is not None:
        if zs[0].shape != batch.repa_target.shape:
            raise ValueError(f"REPA target {tuple(batch.repa_target.shape)} does not match the projector "
                             f"output {tuple(zs[0].shape)} (with a CLS token the target is [CLS; patches])")
        target = F.normalize(batch.repa_target, dim=-1)  # (B, S, D), per token as loss.py:95-97
        cos = [(F.normalize(z, dim=-1) * target).sum(dim=-1).mean() for z in zs]  # mean over batch, tokens
        out["proj"] = -torch.stack(cos).mean()
    return out


def loss_terms(model: SiT, batch: Batch, method: Method, step: int,
               draws: Draws = RANDOM) -> dict[str, torch.Tensor]:
    """Scalar terms `loss, latent, feature, cls, proj`, each already weighted, so that loss is their
    sum in train.py's order; absent terms are zeros. `step` is the number of optimizer steps already
    taken (train.py's global_step, for lambda); the step's draws come from `draws`."""
    for name, on, value in (("features", method.features != "none", batch.features),
                            ("cls", method.cls, batch.cls), ("repa_target", method.repa, batch.repa_target)):
        if on != (value is not None):
            raise ValueError(f"method {method.name!r} {'needs' if on else 'does not use'} batch.{name}")
    per = per_sample_losses(model, batch, method, draws)
    # ReDi's representation dropout also sets the feature loss weight to 0 (transport.py:134, 161).
    lam = 0.0 if per["dropped"] else method.lam(step)
    zero = batch.latent.new_zeros(())
    latent = per["latent"].mean()
    feature = lam * per["feature"].mean() if per["feature"] is not None else zero
    proj = method.w_proj * per["proj"] if per["proj"] is not None else zero
    cls = method.w_cls * per["cls"].mean() if per["cls"] is not None else zero
    return {"loss": latent + feature + proj + cls, "latent": latent, "feature": feature, "cls": cls, "proj": proj}
