"""Where a training step's random numbers come from: one seam for every draw of the step.

A step draws, in the reference's order (train.py + loss.py + models/sit.py):
  1. `posterior`: the VAE posterior noise, `torch.randn_like(mean)` (train.py:57);
  2. `time`: the time, `torch.rand((B, 1, 1, 1))` on the CPU (loss.py:59; `time_normal`,
     `torch.randn`, for the lognormal weighting, loss.py:62);
  3. `noise`: the noise of the latent and feature channels, `torch.randn_like(x)` (loss.py:72);
  4. `noise_cls`: the noise of the CLS token, `torch.randn_like(cls)` (loss.py:73);
  5. `label_drop`: the uniforms of the label dropout, `torch.rand(B)` inside the model (sit.py:88);
  (ReDi's representation dropout, when on, draws `representation_drop` after the noises, as ReDi's
  transport.py:133-136 draws it after t and the noise.)

`Draws()` makes exactly these calls on torch's global RNGs, which the loop seeds per micro-batch
(trainer.loop.micro_seed); it is what `reglue train` uses. `prepare_batch`, `loss_terms` and the SiT's
label dropout take a `Draws`, so a test can serve recorded draws instead (the golden `train_steps` case
replays the reference's through the production step).
"""

from __future__ import annotations

import torch


class Draws:
    """The step's draws from torch's global RNGs, the reference's calls one for one."""

    def posterior(self, mean: torch.Tensor) -> torch.Tensor:
        """N(0, 1) like the posterior mean (B, zc, h, h)."""
        return torch.randn_like(mean)

    def time(self, shape: tuple[int, ...]) -> torch.Tensor:
        """U[0, 1) on the CPU (the caller moves it), for the uniform weighting."""
        return torch.rand(shape)

    def time_normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        """N(0, 1) on the CPU, the log-sigma of the lognormal weighting."""
        return torch.randn(shape)

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        """N(0, 1) like the clean joint input (B, zc + c, h, h)."""
        return torch.randn_like(x)

    def noise_cls(self, cls: torch.Tensor) -> torch.Tensor:
        """N(0, 1) like the clean CLS token (B, D)."""
        return torch.randn_like(cls)

    def representation_drop(self) -> float:
        """U[0, 1) on the CPU: ReDi's representation dropout hits a micro-batch where it is below
        `dino_drop_prob` (ReDi draws Python's `random.random()`; torch's CPU RNG keeps the draw seeded
        per micro-batch and so resumable)."""
        return float(torch.rand(()))

    def label_drop(self, labels: torch.Tensor) -> torch.Tensor:
        """U[0, 1) per label on the labels' device; a label is dropped where it is below the dropout rate."""
        return torch.rand(labels.shape[0], device=labels.device)


RANDOM = Draws()
"""The default: torch's global RNGs."""
