"""Sampler math on models with known answers, guidance bookkeeping, models without CLS, decoding."""

import math

import pytest
import torch

from reglue.trainer.sampling import SamplerConfig, decode, euler_maruyama, ode, sample, sde_time_grid


class GaussianFlow(torch.nn.Module):
    """The exact velocity of the linear path for data ~ N(0, s^2) (and the same for the CLS state):
    x_t ~ N(0, sigma_t^2), sigma_t^2 = (1-t)^2 s^2 + t^2, v = x (t - (1-t) s^2) / sigma_t^2.
    The probability-flow ODE maps x_1 to x_0 = s * x_1. Labels are ignored; forwards are logged."""

    def __init__(self, s: float = 0.5, num_classes: int = 10):
        super().__init__()
        self.s, self.num_classes, self.calls = s, num_classes, []

    def forward(self, x, t, y, cls_token=None):
        self.calls.append((len(x), float(t[0]), y.tolist()))

        def v(z):
            tt = t.double().view(-1, *[1] * (z.dim() - 1))
            var = (1 - tt) ** 2 * self.s ** 2 + tt ** 2
            return (z.double() * (tt - (1 - tt) * self.s ** 2) / var).float()

        return v(x), [], None if cls_token is None else v(cls_token)


def test_ode_heun_beats_euler_on_a_known_flow():
    model = GaussianFlow()
    x1, y = torch.randn(64, 4, 2, 2), torch.zeros(64, dtype=torch.long)
    cls1 = torch.randn(64, 8)
    exact = model.s * x1.double()
    err = {}
    for solver in ("euler", "heun"):
        for steps in (10, 20):
            cfg = SamplerConfig(mode="ode", num_steps=steps, ode_solver=solver, cfg_scale=1)
            x0, cls0 = ode(model, x1, y, cls1, cfg)
            err[solver, steps] = (x0 - exact).abs().max().item()
            torch.testing.assert_close(cls0, model.s * cls1.double(), atol=3 * err[solver, steps] + 1e-9, rtol=0)
    assert err["heun", 10] < err["euler", 10] / 5
    assert 1.6 < err["euler", 10] / err["euler", 20] < 2.4  # first order
    assert 2.8 < err["heun", 10] / err["heun", 20] < 5.5  # second order
    model.calls.clear()
    ode(model, x1, y, None, SamplerConfig(mode="ode", num_steps=10, cfg_scale=1))
    assert len(model.calls) == 19  # Heun: 2 per step, none past t = 0


def test_sde_reaches_the_data_distribution():
    torch.manual_seed(0)
    model = GaussianFlow(s=0.5)
    x1 = torch.randn(4000, 1, 2, 2)
    y = torch.zeros(4000, dtype=torch.long)
    x0, cls0 = euler_maruyama(model, x1, y, None, SamplerConfig(num_steps=100, cfg_scale=1))
    assert cls0 is None and x0.dtype == torch.float64
    assert x0.std().item() == pytest.approx(0.5, rel=0.05) and abs(x0.mean().item()) < 0.02
    assert not torch.allclose(x0, 0.5 * x1.double(), atol=0.05)  # stochastic, unlike the ODE


def test_guidance_interval_batches_and_null_label():
    model = GaussianFlow(num_classes=7)
    y = torch.tensor([3, 5])
    cfg = SamplerConfig(num_steps=250, guidance_high=0.9)
    euler_maruyama(model, torch.randn(2, 4, 2, 2), y, torch.randn(2, 8), cfg)
    grid = sde_time_grid(250)
    assert [c[1] for c in model.calls] == pytest.approx(grid[:-1].tolist())
    guided = [c for c in model.calls if c[0] == 4]
    # eval.sh: the 26 evaluations with t in (0.9, 1] are unguided, 224 guided: 474 forwards per image.
    assert len(guided) == 224 and len(model.calls) == 250 and all(c[1] <= 0.9 for c in guided)
    assert all(c[2] == [3, 5, 7, 7] for c in guided)  # [cond; uncond] with the null id = num_classes
    model.calls.clear()
    sample(model, torch.randn(2, 4, 2, 2), y, None, SamplerConfig(num_steps=5, cfg_scale=1.0))
    assert all(c[0] == 2 for c in model.calls)  # cfg_scale <= 1: never doubled


class LabelShift(torch.nn.Module):
    """v = 0 for the null label, 1 otherwise: the guided drift shows the CFG rule used."""

    num_classes = 10

    def forward(self, x, t, y, cls_token=None):
        v = (y != self.num_classes).float().view(-1, 1, 1, 1).expand_as(x).contiguous()
        return v, [], None if cls_token is None else v[:, 0, 0, :1].expand_as(cls_token)


def test_cfg_rules_on_the_final_velocity():
    """ODE drift is the velocity, so one Euler step from t=1 to 0 exposes the combination directly."""
    x, y, cls = torch.zeros(1, 6, 1, 1), torch.tensor([1]), torch.zeros(1, 3)
    one_step = dict(mode="ode", num_steps=2, ode_solver="euler", guidance_high=1.0)
    out, cls_out = ode(LabelShift(), x, y, cls, SamplerConfig(cfg_scale=3.0, cls_cfg_scale=2.0, **one_step))
    assert out.flatten().tolist() == [-3.0] * 6 and cls_out.flatten().tolist() == [-2.0] * 3  # u + s (c - u), twice
    _, cls_out = ode(LabelShift(), x, y, cls, SamplerConfig(cfg_scale=3.0, cls_cfg_scale=0.0, **one_step))
    assert cls_out.flatten().tolist() == [-1.0] * 3  # cls_cfg_scale 0: conditional CLS drift


def test_bf16_stays_close_to_fp32():
    from test_sampling_generate import tiny_sit

    model, g = tiny_sit(), torch.Generator().manual_seed(0)
    x1, cls1 = torch.randn(4, 8, 8, 8, generator=g), torch.randn(4, 16, generator=g)
    y = torch.tensor([0, 1, 2, 3])
    out = {}
    for precision in ("fp32", "bf16"):
        g.manual_seed(1)  # the same SDE noise for both
        noise = lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype)  # noqa: E731
        out[precision] = euler_maruyama(model, x1, y, cls1, SamplerConfig(num_steps=10, precision=precision),
                                        noise=noise)[0]
    rel = ((out["bf16"] - out["fp32"]).norm() / out["fp32"].norm()).item()
    assert 0 < rel < 0.02, rel


def test_decode_takes_the_latent_channels_and_truncates():
    from reglue import weights

    vae = weights.load_vae(preset="tiny")
    x0 = torch.randn(2, 20, 8, 8, dtype=torch.float64)
    images = decode(vae, x0, latent_channels=4, scaling_factor=0.18215)
    assert images.dtype == torch.uint8 and images.shape == (2, 64, 64, 3)
    x0[:, 4:] = 1e3  # feature channels never reach the VAE
    assert torch.equal(decode(vae, x0, 4, 0.18215), images)
    raw = (vae.decode(x0[:, :4].float() / 0.18215).sample + 1) / 2
    want = torch.clamp(255 * raw, 0, 255).floor().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(images, want)  # floor, not round (generate.py:157-168)


def test_config_validation():
    with pytest.raises(ValueError, match="sde|ode"):
        SamplerConfig(mode="ddim")
    with pytest.raises(ValueError, match="precision"):
        SamplerConfig(precision="fp16")
    assert math.isclose(sde_time_grid(8)[1].item(), 0.8628571428571429)  # golden sde_sampler's grid
