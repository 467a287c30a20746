"""Golden runners for the sampling area (registered into `golden.RUNNERS`)."""

import numpy as np
import torch
from golden import Case, runner


@runner("frechet")
def run_frechet(case: Case):
    """ADM `compute_statistics` + `frechet_distance` on every recorded pair, with mu/sigma too."""
    from reglue.trainer.metrics import frechet_distance, statistics

    tol = case.tol()
    sets = sorted(k[len("in.acts_"):] for k in case.tensors if k.startswith("in.acts_"))
    acts = {k: case.tensors[f"in.acts_{k}"].float().numpy() for k in sets}  # float32, as TF gives
    stats = {k: statistics(a) for k, a in acts.items()}
    for k, (mu, sigma) in stats.items():
        np.testing.assert_allclose(mu, case.tensors[f"out.mu_{k}"].double().numpy(), **tol)
        np.testing.assert_allclose(sigma, case.tensors[f"out.sigma_{k}"].numpy(), **tol)
    for pair in case.meta["fid"]:
        want = case.tensors[f"out.fid_{pair}"].item()
        a = next(x for x in sets if pair.startswith(x) and pair[len(x):] in sets)  # "AB" -> A, B
        b = pair[len(a):]
        # From our float64 statistics, and from the reference's own (float32 mu, float64 sigma).
        ours = frechet_distance(*stats[a], *stats[b])
        theirs = frechet_distance(*(case.tensors[f"out.{s}_{x}"].numpy() for x in (a, b) for s in ("mu", "sigma")))
        assert abs(ours - want) <= tol["atol"] + tol["rtol"] * abs(want), (pair, ours, want)
        assert abs(theirs - want) <= 1e-6 + 1e-8 * abs(want), (pair, theirs, want)


@runner("sde_sampler")
def run_sde_sampler(case: Case):
    """The reference Euler-Maruyama sampler on the sit_forward weights, every vae_cfg mode listed, with every
    Gaussian replayed from the recorded draws (float64, as the reference's state)."""
    from reglue.trainer.models import SiT, sit_kwargs_from_reference
    from reglue.trainer.sampling import SamplerConfig, euler_maruyama, sde_time_grid

    kwargs = case.meta["model"]["constructor_kwargs"]
    # samplers.py:61 hard-codes the null label 1000; ours is num_classes, the same id at 1000 classes
    assert kwargs["num_classes"] == 1000, "the reference sampler needs exactly 1000 classes for its null label"
    model = SiT(**sit_kwargs_from_reference(kwargs))
    model.load_state_dict(case.model_state(), strict=True)
    model.eval()
    kw = case.meta["sampler_kwargs"]  # `heun` is accepted and unused by the reference (samplers.py:51)
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
                            guidance_high=kw["guidance_high"], vae_cfg=vae_cfg == "true",
                            path=kw.get("path_type", "linear"))
        grid = case.meta.get("time_grid")
        if grid is not None:  # the same grid, and guidance at the same steps
            torch.testing.assert_close(sde_time_grid(cfg.num_steps), torch.tensor(grid["values"], dtype=torch.float64))
            assert [cfg.guided_at(s["t_cur"]) for s in grid["steps"]] == [s["cfg_applied"] for s in grid["steps"]]
        # the reference's vae_cfg guides channels [:4] (samplers.py), the SD-VAE latent
        x, cls = euler_maruyama(model, case.tensors["in.latents"].float(), case.tensors["in.y"],
                                case.tensors["in.cls_latents"].float(), cfg, latent_channels=4, noise=noise)
        assert next(served, None) is None, "the sampler drew fewer Gaussians than the reference"
        torch.testing.assert_close(x.float(), case.tensors[f"out.vae_cfg_{vae_cfg}.latent"], **tol)
        torch.testing.assert_close(cls.float(), case.tensors[f"out.vae_cfg_{vae_cfg}.cls"], **tol)
