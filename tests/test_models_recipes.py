"""The baselines' own recipes: presets, ReDi's PCA file, ReDi's CFG rule and representation dropout."""

import io
import os
import sys
import types
import zipfile
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from golden_models import one_thread  # noqa: F401  (autouse: one intra-op thread)
from test_models_objective import DINO, ZC, H, make_batch

from reglue.pipeline.compressor import UnsafeFileError
from reglue.trainer.draws import Draws
from reglue.trainer.models import build_sit
from reglue.trainer.objective import METHODS, Method, _joint, get_method, loss_terms, per_sample_losses, sit_io
from reglue.trainer.pca import PCA, load_pca_file
from reglue.trainer.recipes import DINOV2_B, RECIPES, encoder_note, get_recipe
from reglue.trainer.runfolder import load_or_fit_pca
from reglue.trainer.sampling import SamplerConfig, sample


def test_each_preset_is_its_papers_recipe():
    got = {name: (r.precision, r.grad_clip, r.flip, r.encoder) for name, r in RECIPES.items()}
    assert got == {"sit": ("fp32", None, True, None), "repa": ("bf16", 1.0, False, DINOV2_B),
                   "reg": ("bf16", 1.0, False, DINOV2_B),
                   "redi": ("fp32", None, False, "vit_base_patch14_reg4_dinov2.lvd142m"),
                   "reglue": ("bf16", 1.0, False, "vit_base_patch14_reg4_dinov2.lvd142m")}
    assert [n for n, r in RECIPES.items() if r.xl_lam_rule] == ["reglue"] and set(RECIPES) == set(METHODS)
    assert all(r.source and ":" in r.source for r in RECIPES.values())
    sit = get_recipe("sit")
    assert sit.override(precision="bf16", grad_clip=0.5, flip=False) == \
        sit.__class__(**{**vars(sit), "precision": "bf16", "grad_clip": 0.5, "flip": False})
    assert get_recipe("reglue").override(grad_clip=0).grad_clip is None and sit.override() == sit
    with pytest.raises(ValueError, match="grad_clip"):
        sit.override(grad_clip=-1)
    # the cache's encoder against the paper's: one line, only where they differ and DINOv2 is used
    meta = SimpleNamespace(encoders={"dino": {"name": "vit_base_patch14_reg4_dinov2.lvd142m"}})
    note = encoder_note("repa", RECIPES["repa"], meta, uses_dino=True)
    assert "dinov2_vitb14 (" in note and f"--encoder {DINOV2_B}" in note and "\n" not in note
    assert encoder_note("reglue", RECIPES["reglue"], meta, uses_dino=True) is None
    assert encoder_note("sit", RECIPES["sit"], meta, uses_dino=False) is None


def test_snapshots_of_older_methods_take_the_presets_new_fields():
    old = {k: v for k, v in vars(METHODS["redi"]).items() if k not in ("dino_drop_prob", "vae_cfg_rule")}
    assert Method.from_dict(old) == METHODS["redi"] and Method.from_dict(old).vae_cfg_rule == "redi"
    with pytest.raises(ValueError, match="dino_drop_prob"):
        get_method("sit", dino_drop_prob=0.2)  # no semantic channels to drop


# ---- ReDi's PCA file ----------------------------------------------------------------------------

def redi_pca_file(path, monkeypatch, D=DINO, n=256, offset=0.1):
    """A file in the format of ReDi's pcs/dino_pca_model.pth (calc_pca.py:173-179): torch.save of
    {'pca_model': sklearn PCA, 'mean', 'std'}, numpy arrays pickled under NumPy < 2 names (as the released
    file). Returns the arrays it holds."""
    module = types.ModuleType("sklearn.decomposition._pca")

    class FakePCA:  # pickled as sklearn.decomposition._pca.PCA; its fields as sklearn 1.6 saves them
        pass

    FakePCA.__module__, FakePCA.__qualname__, module.PCA = module.__name__, "PCA", FakePCA
    for name in ("sklearn", "sklearn.decomposition"):  # the pickler imports the class's module path
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name, types.ModuleType(name)))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((n, D)) * rng.uniform(0.5, 2, D) + rng.standard_normal(D)).astype(np.float32)
    mean, std = x.mean(0), x.std(0)
    f = (x - mean) / std
    values, vectors = np.linalg.eigh(np.cov(f.T, bias=True))
    comps = vectors[:, ::-1].T.astype(np.float32)
    pca = FakePCA()
    pca.__dict__.update(n_components=D, whiten=False, svd_solver="auto", n_features_in_=D, n_samples_=n,
                        _fit_svd_solver="covariance_eigh", mean_=f.mean(0) + offset, components_=comps,
                        explained_variance_=values[::-1].astype(np.float32), noise_variance_=0.0,
                        singular_values_=np.sqrt(values[::-1] * n), _sklearn_version="1.6.0")
    buffer = io.BytesIO()
    torch.save({"pca_model": pca, "mean": mean, "std": std}, buffer)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):  # protocol 2 GLOBALs end in newlines: renaming is safe
                assert b"numpy._core.multiarray\n_reconstruct" in data
                data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
            dst.writestr(item, data)
    return dict(mean=mean, std=std, center=pca.mean_, components=comps, tokens=x)


def test_redis_released_pca_file_loads_safely_and_projects_as_train_redi(tmp_path, monkeypatch):
    path = tmp_path / "dino_pca_model.pth"
    ref = redi_pca_file(path, monkeypatch)
    monkeypatch.delitem(sys.modules, "sklearn.decomposition._pca")  # loading must not need sklearn
    pca = load_pca_file(path, 3)
    assert pca.components.shape == (3, DINO) and torch.equal(pca.center, torch.from_numpy(ref["center"]))
    tokens = torch.from_numpy(ref["tokens"][:16]).reshape(1, 16, DINO)  # one image of 4 x 4 patches
    # train_redi.py:306-310: standardize, minus pca.mean_, @ components[:rank].T, tokens to a row-major grid
    want = (((tokens - torch.from_numpy(ref["mean"])) / torch.from_numpy(ref["std"]) - torch.from_numpy(ref["center"]))
            @ torch.from_numpy(ref["components"][:3]).T).reshape(1, 4, 4, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(pca.project(tokens), want, rtol=1e-6, atol=1e-6)
    # a run copies it once into RUN/pca.safetensors (what a resumed run reads)
    acc = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, device=torch.device("cpu"))
    cache = SimpleNamespace(meta=SimpleNamespace(dino_dim=DINO), url="cache.zarr")
    saved = load_or_fit_pca(tmp_path / "run", cache, get_method("redi", feature_channels=3), 0, acc, str(path))
    assert all(torch.equal(getattr(saved, k), getattr(pca, k)) for k in ("mean", "std", "components", "center"))
    assert torch.equal(PCA.load(tmp_path / "run" / "pca.safetensors").components, pca.components)
    with pytest.raises(ValueError, match="holds 16 PCA components"):
        load_pca_file(path, 17)


def test_a_pca_file_of_another_kind_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"pca_model": Evil(), "mean": np.zeros(4, np.float32), "std": np.ones(4, np.float32)},
               tmp_path / "evil.pth")
    with pytest.raises(UnsafeFileError, match="refused to load"):
        load_pca_file(tmp_path / "evil.pth", 2)
    assert not marker.exists()
    torch.save({"mean": np.zeros(4, np.float32)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not ReDi's PCA file"):
        load_pca_file(tmp_path / "other.pth", 2)


# ---- ReDi's CFG rule and representation dropout -------------------------------------------------

class Constant(torch.nn.Module):
    """A velocity model: channel c gets cond[c] for a label, uncond[c] for the null label (num_classes)."""

    num_classes = 4

    def __init__(self, cond, uncond):
        super().__init__()
        self.cond, self.uncond = torch.tensor(cond).view(1, -1, 1, 1), torch.tensor(uncond).view(1, -1, 1, 1)

    def forward(self, x, t, y, cls_token=None):
        null = (y == self.num_classes).view(-1, 1, 1, 1)
        return torch.where(null, self.uncond, self.cond).expand_as(x).clone(), [], None


@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_redi_models_guide_the_vae_channels_by_redis_rule(mode):
    cond, uncond, s = [1.0, -2.0, 0.5, 3.0, 4.0, -1.0], [0.5, 1.0, 0.0, 1.0, -3.0, 2.0], 2.4
    x0 = torch.randn(2, 6, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3])
    zeros = torch.zeros_like
    # ReDi's forward_with_cfg_vae (models.py:318-323): u + s(c - u) on the 4 VAE channels, cond on the rest,
    # at every step of either sampler: the same as an unguided model with that velocity
    redi = [u + s * (c - u) for c, u in zip(cond[:4], uncond[:4])] + cond[4:]
    guided = SamplerConfig(mode=mode, num_steps=4, cfg_scale=s, guidance_high=1.0, vae_cfg=True)
    got, _ = sample(Constant(cond, uncond), x0, y, cfg=guided, latent_channels=4, noise=zeros, vae_cfg_rule="redi")
    want, _ = sample(Constant(redi, redi), x0, y, cfg=SamplerConfig(mode=mode, num_steps=4, cfg_scale=1.0),
                     latent_channels=4, noise=zeros)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # the model outputs float32
    # REGLUE's rule differs (c + s(c - u)), so the two are told apart
    other, _ = sample(Constant(cond, uncond), x0, y, cfg=guided, latent_channels=4, noise=zeros)
    assert not torch.allclose(other, got)


def test_representation_dropout_zeroes_the_features_and_their_weight():
    method = get_method("redi", dino_drop_prob=0.5, feature_channels=16)
    torch.manual_seed(0)
    model = build_sit("SiT-tiny/2", num_classes=4, **sit_io(method, latent_channels=ZC, latent_size=H, dino_dim=DINO))
    model.eval()  # no label dropout: the two forwards below see the same labels
    batch = make_batch(method)
    dropped = kept = 0
    for seed in range(12):
        torch.manual_seed(seed)  # the draws loss_terms makes: t, noise, then the dropout uniform (transport.py)
        t, noise = torch.rand((len(batch.labels), 1, 1, 1)), torch.randn_like(_joint(batch))
        drop = bool(torch.rand(()) < 0.5)
        torch.manual_seed(seed)
        terms = loss_terms(model, batch, method, 0)
        fixed = type("Fixed", (Draws,), {"time": lambda self, shape, t=t: t,
                                         "noise": lambda self, x, noise=noise: noise})()
        features = torch.zeros_like(batch.features) if drop else batch.features
        per = per_sample_losses(model, replace(batch, features=features), replace(method, dino_drop_prob=0.0), fixed)
        torch.testing.assert_close(terms["latent"], per["latent"].mean(), rtol=0, atol=0)
        assert (terms["feature"] == 0) == drop and (drop or torch.equal(terms["feature"], per["feature"].mean()))
        dropped, kept = dropped + drop, kept + (not drop)
    assert dropped and kept
