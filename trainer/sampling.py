"""Samplers for the linear-path velocity model: the reference Euler-Maruyama SDE and an ODE.

The SDE is REGLUE `samplers.py:46-180` (reference-implementation.md §7), step for step:
- time grid `linspace(1.0, 0.04, num_steps)` in float64 plus a final 0: num_steps-1 stochastic
  steps, then one deterministic Euler step from 0.04 to 0 that returns the mean (NFE = num_steps);
- state kept in float64, the model run on a float32 copy (fp32 weights; TF32 is the caller's choice);
- diffusion g^2(t) = 2t, score from velocity through the path (linear; cosine for a model trained on
  it), drift d = v - g^2/2 * s;
- CFG on the drift within the guidance interval [low, high], the cond/uncond halves batched in one
  forward (y_null = num_classes; both halves see the same noisy latent, features and CLS);
- the CLS state is denoised alongside with its own scale (`cls_cfg_scale`, cond-only when 0) and,
  unlike the reference, returned.
The ODE (which the reference lacks: its `--mode ode` exits silently) integrates dx/dt = v on
`linspace(1, 0, num_steps + 1)` with Euler or Heun (no Heun correction into t=0), REPA-style.

Every Gaussian comes from `noise(like)`, a `torch.randn_like` stand-in: the golden test replays the
reference's draws through it, and `generate.py` passes per-sample generators.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch

Noise = Callable[[torch.Tensor], torch.Tensor]
"""Returns a standard-normal tensor shaped, typed and placed like its argument (as torch.randn_like)."""


@dataclass(frozen=True)
class SamplerConfig:
    """How to integrate from noise to data. Defaults: the released eval.sh (the `eval-sh` preset)."""

    mode: Literal["sde", "ode"] = "sde"
    """"sde" (the reference Euler-Maruyama) or "ode" (deterministic)."""
    num_steps: int = 250
    """Grid points: SDE NFE = num_steps; ODE steps (Heun NFE = 2*num_steps - 1)."""
    cfg_scale: float = 2.3
    """Classifier-free guidance scale on the latent and feature drift; <= 1 turns guidance off."""
    cls_cfg_scale: float = 2.3
    """Guidance scale of the CLS drift when guidance is on; 0 keeps the conditional CLS drift."""
    guidance_low: float = 0.0
    """Guidance applies for guidance_low <= t <= guidance_high (t = 1 is noise)."""
    guidance_high: float = 0.9
    """See guidance_low. eval.sh uses 0.9 (REG used 0.85)."""
    vae_cfg: bool = False
    """Guide only the latent channels, by the rule of the model's method: REGLUE's --vae_cfg (its non-standard
    d_c + s*(d_c - d_u), SDE loop steps only; the final step stays standard, on all channels) or, for a
    redi model, ReDi's --cfg-vae (standard u + s(c - u) on the latent channels, every step)."""
    ode_solver: Literal["euler", "heun"] = "heun"
    """"euler" or "heun" (ODE mode only)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Model precision: "fp32" (reference parity) or "bf16" (autocast; state and CFG stay float64)."""
    path: str = "linear"
    """The interpolant the model was trained on (trainer.objective.Method.path), for the SDE's score
    (samplers.py:15-39 `path_type`); `reglue sample` takes it from the checkpoint."""

    def __post_init__(self):
        if self.mode not in ("sde", "ode") or self.ode_solver not in ("euler", "heun"):
            raise ValueError(f"mode must be sde|ode and ode_solver euler|heun; got {self.mode!r}, {self.ode_solver!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16; got {self.precision!r}")
        if self.path not in ("linear", "cosine"):
            raise ValueError(f"path must be linear or cosine; got {self.path!r}")
        if self.num_steps < 2:
            raise ValueError(f"num_steps must be >= 2; got {self.num_steps}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0

    def guided_at(self, t: float) -> bool:
        return self.guided and self.guidance_low <= t <= self.guidance_high


# ---- evaluation presets: which sampler settings produced which number ---------------------------

@dataclass(frozen=True)
class EvalPreset:
    """The sampler settings and sample count behind a published number."""

    row: str
    """The number it reproduces, and its source."""
    sampler: SamplerConfig
    num: int = 50_000
    """Samples scored (ADM protocol: 50K against VIRTUAL_imagenet256_labeled.npz)."""


EVAL_PRESETS: dict[str, EvalPreset] = {
    # The released eval.sh (eval.sh:4-10, generate.py's --mode=sde): the recommended sampling of the official
    # SiT-XL/2 1M checkpoint; SamplerConfig's defaults.
    "eval-sh": EvalPreset("released eval.sh (SiT-XL/2 + REGLUE, 1M checkpoint)", SamplerConfig()),
    # Paper Tables 2, 3, 9: every number without guidance (SiT-B/2 12.9 at 400K, SiT-XL/2 3.2 / 2.5 at 400K / 1M,
    # the baselines' rows), the SDE of eval.sh with CFG off; the guidance interval and CLS-CFG then play no part.
    "paper-nocfg": EvalPreset("paper Tables 2, 3, 9: the rows without CFG", SamplerConfig(cfg_scale=1.0)),
    # Paper Tables 4 and 10: SiT-XL/2 + REGLUE at 160 epochs (800K), FID 1.53 with w = 2.8 on [0, 0.9]. The paper
    # gives no CLS-CFG for it; eval.sh's 2.3 is used.
    "paper-xl-160ep": EvalPreset("paper Tables 4, 10: SiT-XL/2 + REGLUE, 160 epochs (800K), FID 1.53",
                                 SamplerConfig(cfg_scale=2.8, guidance_high=0.9)),
    # Paper Table 4: SiT-XL/2 + REGLUE at 80 epochs (400K), FID 1.61. Its settings are assumed to be Table 10's
    # (w = 2.8 on [0, 0.9]), which the paper states for the 160-epoch row; CLS-CFG as above.
    "paper-xl-80ep": EvalPreset("paper Table 4: SiT-XL/2 + REGLUE, 80 epochs (400K), FID 1.61",
                                SamplerConfig(cfg_scale=2.8, guidance_high=0.9)),
}
DEFAULT_PRESET = "eval-sh"
"""What `reglue sample` and `reglue fid CKPT` use unless told otherwise."""


def resolve_preset(name: str | None = None, *, num: int | None = None, **sampler) -> tuple[SamplerConfig, int]:
    """(sampler settings, sample count) of preset `name` (default DEFAULT_PRESET), every given value (not
    None) replacing the preset's: `resolve_preset("paper-xl-160ep", cfg_scale=3.0, num=10_000)`."""
    name = name or DEFAULT_PRESET
    if name not in EVAL_PRESETS:
        raise ValueError(f"unknown sampling preset {name!r}; choose from {', '.join(EVAL_PRESETS)} "
                         "(docs/sampling.md, 'Evaluation presets')")
    preset = EVAL_PRESETS[name]
    given = {k: v for k, v in sampler.items() if v is not None}
    return replace(preset.sampler, **given), preset.num if num is None else num


def sde_time_grid(num_steps: int) -> torch.Tensor:
    """samplers.py:66-67: linspace(1.0, 0.04, num_steps) in float64, then 0."""
    grid = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64)
    return torch.cat([grid, torch.zeros(1, dtype=torch.float64)])


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, path: str = "linear") -> torch.Tensor:
    """samplers.py:15-39: the score of x_t from the velocity on the linear path (alpha = 1 - t,
    sigma = t) or the cosine one, written as the reference writes it so that float64 rounding matches."""
    t = t.view(-1, *[1] * (x.dim() - 1))
    if path == "linear":
        alpha, d_alpha = 1 - t, -torch.ones_like(x)
        sigma, d_sigma = t, torch.ones_like(x)
    else:
        alpha, sigma = torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)
        d_alpha, d_sigma = -math.pi / 2 * torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)
    ratio = alpha / d_alpha
    var = sigma ** 2 - ratio * d_sigma * sigma
    return (ratio * v - x) / var


def _velocity(model, x, cls, y, t: torch.Tensor, guided: bool, precision: str):
    """One model evaluation at time t for the whole batch, [cond; uncond] stacked when guided.

    Returns the velocities and the float64 inputs they belong to (the score needs them)."""
    if guided:
        x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, model.num_classes)])
        cls = None if cls is None else torch.cat([cls, cls])
    time = torch.ones(len(x), dtype=torch.float64, device=x.device) * t
    with torch.autocast(x.device.type, torch.bfloat16, enabled=precision == "bf16"):
        v, _, cls_v = model(x.float(), time.float(), y, cls_token=None if cls is None else cls.float())
    return v.double(), None if cls_v is None else cls_v.double(), x, cls, time


def _guide(d: torch.Tensor, scale: float, latent_only: int | None = None, rule: str = "reglue") -> torch.Tensor:
    """Standard CFG d_u + s*(d_c - d_u); with `latent_only=zc`, guidance of channels < zc only, d_c elsewhere:
    rule 'reglue' is the reference's --vae_cfg (samplers.py, REGLUE addition) d_c + s*(d_c - d_u), rule
    'redi' is ReDi's --cfg-vae u + s(c - u) (models.py:318-323; the kept half's features are conditional)."""
    cond, uncond = d.chunk(2)
    if latent_only is None:
        return uncond + scale * (cond - uncond)
    out = cond.clone()
    base = uncond if rule == "redi" else cond
    out[:, :latent_only] = base[:, :latent_only] + scale * (cond[:, :latent_only] - uncond[:, :latent_only])
    return out


def _drift(model, x, cls, y, t: torch.Tensor, cfg: SamplerConfig, latent_channels: int, final: bool,
           vae_cfg_rule: str = "reglue"):
    """Guided drift of the latent and the CLS state: SDE drift v - t*s, or the velocity for the ODE.

    CFG of the drift equals CFG of the velocity (the drift is affine in v and both rules' weights sum to 1),
    so ReDi's rule, which guides its model output, applies here unchanged."""
    guided = cfg.guided_at(t.item())
    v, cls_v, x_in, cls_in, time = _velocity(model, x, cls, y, t, guided, cfg.precision)
    if cfg.mode == "sde":
        diffusion = 2 * t  # g^2(t) = 2t (samplers.py:42-43)
        v = v - 0.5 * diffusion * score_from_velocity(v, x_in, time, cfg.path)
        if cls_v is not None:
            cls_v = cls_v - 0.5 * diffusion * score_from_velocity(cls_v, cls_in, time, cfg.path)
    if not guided:
        return v, cls_v
    # The reference's rule guides only the SDE loop steps (its final step is standard CFG, samplers.py:167-175);
    # ReDi's is its model function, used by every step of either sampler (sample_ddp.py:212-218).
    latent_only = latent_channels if cfg.vae_cfg and (
        vae_cfg_rule == "redi" or (cfg.mode == "sde" and not final)) else None
    v = _guide(v, cfg.cfg_scale, latent_only, vae_cfg_rule)
    if cls_v is not None:
        cls_v = _guide(cls_v, cfg.cls_cfg_scale) if cfg.cls_cfg_scale > 0 else cls_v.chunk(2)[0]
    return v, cls_v


@torch.no_grad()
def euler_maruyama(model, latents: torch.Tensor, y: torch.Tensor, cls_latents: torch.Tensor | None = None,
                   cfg: SamplerConfig = SamplerConfig(), *, latent_channels: int = 4,
                   noise: Noise = torch.randn_like,
                   vae_cfg_rule: str = "reglue") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference SDE sampler. latents [B,C,h,h] (C = latent + feature channels), y [B],
    cls_latents [B,D] or None for a model without CLS. Returns float64 (x_0 [B,C,h,h], cls_0 or None)."""
    grid = sde_time_grid(cfg.num_steps).to(latents.device)
    x = latents.to(torch.float64)
    cls = None if cls_latents is None else cls_latents.to(torch.float64)
    for t, t_next in zip(grid[:-2], grid[1:-1]):
        dt = t_next - t
        eps = noise(x)  # draw order as the reference: latent, then CLS (golden sde_sampler)
        cls_eps = None if cls is None else noise(cls)
        d, cls_d = _drift(model, x, cls, y, t, cfg, latent_channels, False, vae_cfg_rule)
        x = x + d * dt + torch.sqrt(2 * t) * (eps * torch.sqrt(torch.abs(dt)))
        if cls is not None:
            cls = cls + cls_d * dt + torch.sqrt(2 * t) * (cls_eps * torch.sqrt(torch.abs(dt)))
    t, dt = grid[-2], grid[-1] - grid[-2]  # the final deterministic step returns the mean
    d, cls_d = _drift(model, x, cls, y, t, cfg, latent_channels, True, vae_cfg_rule)
    return x + dt * d, None if cls is None else cls + dt * cls_d


@torch.no_grad()
def ode(model, latents: torch.Tensor, y: torch.Tensor, cls_latents: torch.Tensor | None = None,
        cfg: SamplerConfig = SamplerConfig(mode="ode"), *,
        latent_channels: int = 4, vae_cfg_rule: str = "reglue") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Deterministic probability-flow sampler (Euler or Heun) with the same guidance options."""
    grid = torch.linspace(1.0, 0.0, cfg.num_steps + 1, dtype=torch.float64, device=latents.device)
    x = latents.to(torch.float64)
    cls = None if cls_latents is None else cls_latents.to(torch.float64)
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t_next - t
        d, cls_d = _drift(model, x, cls, y, t, cfg, latent_channels, False, vae_cfg_rule)
        x_next = x + dt * d
        cls_next = None if cls is None else cls + dt * cls_d
        if cfg.ode_solver == "heun" and i < cfg.num_steps - 1:  # no correction at t = 0 (REPA euler_sampler)
            d2, cls_d2 = _drift(model, x_next, cls_next, y, t_next, cfg, latent_channels, False, vae_cfg_rule)
            x_next = x + dt * (0.5 * d + 0.5 * d2)
            cls_next = None if cls is None else cls + dt * (0.5 * cls_d + 0.5 * cls_d2)
        x, cls = x_next, cls_next
    return x, cls


def sample(model, latents, y, cls_latents=None, cfg: SamplerConfig = SamplerConfig(), *,
           latent_channels: int = 4, noise: Noise = torch.randn_like, vae_cfg_rule: str = "reglue"):
    """Dispatch on cfg.mode; returns float64 (x_0, cls_0 or None). `vae_cfg_rule` is the model's method's
    (trainer.objective.Method.vae_cfg_rule): which rule `cfg.vae_cfg` means for it."""
    if cfg.mode == "ode":
        return ode(model, latents, y, cls_latents, cfg, latent_channels=latent_channels, vae_cfg_rule=vae_cfg_rule)
    return euler_maruyama(model, latents, y, cls_latents, cfg, latent_channels=latent_channels, noise=noise,
                          vae_cfg_rule=vae_cfg_rule)


@torch.no_grad()
def decode(vae, x0: torch.Tensor, latent_channels: int, scaling_factor: float) -> torch.Tensor:
    """Latent (first `latent_channels` of x0) -> uint8 images [B,H,W,3] as generate.py:157-168:
    z / 0.18215, VAE decode, (x+1)/2, clamp(255x, 0, 255).to(uint8). The reference truncates (no
    +0.5, unlike DiT/SiT's rounding, ~half a level darker); kept for comparable FID."""
    z = x0[:, :latent_channels].float() / scaling_factor
    images = (vae.decode(z).sample + 1) / 2
    return torch.clamp(255 * images, 0, 255).to(torch.uint8).permute(0, 2, 3, 1)
