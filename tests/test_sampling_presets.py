"""Evaluation presets: the table resolves, explicit options override it, and `reglue sample` / `reglue fid CKPT`
sample with it (the default preset being SamplerConfig's defaults)."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from reglue.cli import app
from reglue.trainer.sampling import DEFAULT_PRESET, EVAL_PRESETS, SamplerConfig, resolve_preset

DOCS = Path(__file__).resolve().parents[1] / "docs" / "sampling.md"


def test_presets_resolve_and_given_values_override():
    assert resolve_preset() == (SamplerConfig(), 50_000) == resolve_preset(DEFAULT_PRESET)
    sampler, num = resolve_preset("paper-xl-160ep")
    assert (sampler.mode, sampler.num_steps, sampler.cfg_scale, sampler.guidance_low, sampler.guidance_high,
            num) == ("sde", 250, 2.8, 0.0, 0.9, 50_000)
    assert not resolve_preset("paper-nocfg")[0].guided
    sampler, num = resolve_preset("paper-xl-160ep", num=10, cfg_scale=3.0, guidance_high=None, mode=None)
    assert (sampler.cfg_scale, sampler.guidance_high, sampler.mode, num) == (3.0, 0.9, "sde", 10)
    with pytest.raises(ValueError, match="unknown sampling preset 'paper'.*paper-xl-160ep"):
        resolve_preset("paper")
    table = DOCS.read_text()
    assert all(f"`{name}`" in table for name in EVAL_PRESETS)


def test_sample_and_fid_sample_with_the_preset(monkeypatch, tmp_path):
    import reglue.trainer.evaluate as evaluate
    import reglue.trainer.generate as generate

    seen = []
    monkeypatch.setattr(generate, "generate", lambda cfg: seen.append(cfg) or tmp_path / "s.npz")
    monkeypatch.setattr(evaluate, "evaluate_source", lambda cfg, gen=None: seen.append(gen) or {"summary": "ok"})
    run = lambda *args: CliRunner().invoke(app, [str(a) for a in args])  # noqa: E731
    assert run("sample", "ckpt.pt", "--preset", "paper-xl-160ep", "--cfg-scale", 3, "-n", 7).exit_code == 0
    assert (seen[-1].sampler.cfg_scale, seen[-1].sampler.guidance_high, seen[-1].num) == (3.0, 0.9, 7)
    assert run("sample", "ckpt.pt", "--no-vae-cfg").exit_code == 0
    assert (seen[-1].sampler, seen[-1].num) == (SamplerConfig(), 50_000)
    assert run("fid", "ckpt.pt", "--ref", "ref.npz").exit_code == 0
    assert (seen[-1].sampler, seen[-1].num) == resolve_preset(DEFAULT_PRESET)
    assert run("fid", "ckpt.pt", "--ref", "ref.npz", "--preset", "paper-nocfg", "--num", 5).exit_code == 0
    assert seen[-1].sampler.cfg_scale == 1.0 and seen[-1].num == 5
    result = run("sample", "ckpt.pt", "--preset", "bogus")  # a choice: refused in one line that lists the presets
    assert result.exit_code == 2 and "'bogus' is not one of" in result.output and "paper-xl-160ep" in result.output
