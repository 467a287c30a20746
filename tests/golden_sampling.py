"""Golden runners for the sampling area (registered into `golden.RUNNERS`)."""

import numpy as np
import torch
from golden import Case, runner


@runner("frechet")
def run_frechet(case: Case):
    """ADM `compute_statistics` + `frechet_distance` on every recorded pair, with mu/sigma too."""
    from reglue.trainer.metrics import frechet_distance, statistics

    tol = case.tol()
    acts = {k: case.tensors[f"in.acts_{k}"].float().numpy() for k in "ABC"}  # float32, as TF gives
    stats = {k: statistics(a) for k, a in acts.items()}
    for k, (mu, sigma) in stats.items():
        np.testing.assert_allclose(mu, case.tensors[f"out.mu_{k}"].double().numpy(), **tol)
        np.testing.assert_allclose(sigma, case.tensors[f"out.sigma_{k}"].numpy(), **tol)
    for pair in case.meta["fid"]:
        want = case.tensors[f"out.fid_{pair}"].item()
        a, b = pair
        # From our float64 statistics, and from the reference's own (float32 mu, float64 sigma).
        ours = frechet_distance(*stats[a], *stats[b])
        theirs = frechet_distance(*(case.tensors[f"out.{s}_{x}"].numpy() for x in (a, b) for s in ("mu", "sigma")))
        assert abs(ours - want) <= tol["atol"] + tol["rtol"] * abs(want), (pair, ours, want)
        assert abs(theirs - want) <= 1e-6 + 1e-8 * abs(want), (pair, theirs, want)


@runner("sde_sampler")
def run_sde_sampler(case: Case):
    """The reference Euler-Maruyama sampler on the sit_forward weights, both vae_cfg modes, with every
    Gaussian replayed from the recorded draws (float64, as the reference's state)."""
    from reglue.trainer.models import SiT, sit_kwargs_from_reference
    from reglue.trainer.sampling import SamplerConfig, euler_maruyama

    model = SiT(**sit_kwargs_from_reference(case.meta["model"]["constructor_kwargs"]))
    model.load_state_dict(case.sibling("sit_forward").state(), strict=True)
    model.eval()
    kw = case.meta["sampler_kwargs"]
    draws = [case.tensors[f"in.noise_{i:03d}"] for i in range(case.meta["random_draws"]["count"])]
    tol = case.tol()
    for vae_cfg in kw["args"]["vae_cfg"]:
        served = iter(draws)

        def noise(like, served=served):
            eps = next(served)
            assert eps.shape == like.shape
            return eps.to(like.device, torch.float64)

        cfg = SamplerConfig(num_steps=kw["num_steps"], cfg_scale=kw["cfg_scale"],
                            cls_cfg_scale=kw["args"]["cls_cfg_scale"], guidance_low=kw["guidance_low"],
                            guidance_high=kw["guidance_high"], vae_cfg=vae_cfg == "true")
        x, cls = euler_maruyama(model, case.tensors["in.latents"].float(), case.tensors["in.y"],
                                case.tensors["in.cls_latents"].float(), cfg, noise=noise)
        assert next(served, None) is None, "the sampler drew fewer Gaussians than the reference"
        torch.testing.assert_close(x.float(), case.tensors[f"out.vae_cfg_{vae_cfg}.latent"], **tol)
        torch.testing.assert_close(cls.float(), case.tensors[f"out.vae_cfg_{vae_cfg}.cls"], **tol)
