"""The objective: methods, the lambda schedule, draw order, and that each method's loss trains."""

import pytest
import torch
from golden_models import one_thread  # noqa: F401  (autouse: one intra-op thread)

from reglue.trainer.draws import Draws
from reglue.trainer.models import build_sit
from reglue.trainer.objective import METHODS, XL_LAM_SCHEDULE, Batch, Method, get_method, loss_terms, sit_io

DINO, H, ZC = 16, 8, 4  # tiny DINO width, latent side (4 x 4 tokens) and latent channels


def test_method_presets_imply_the_model_inputs():
    dims = dict(latent_channels=ZC, latent_size=H, dino_dim=768, compressed_channels=16)
    io = {name: sit_io(m, **dims) for name, m in METHODS.items()}
    assert io["sit"] == dict(input_size=H, in_channels=4, cls_dim=None, z_dims=())
    assert io["repa"] == dict(input_size=H, in_channels=4, cls_dim=None, z_dims=(768,))
    assert io["reg"] == dict(input_size=H, in_channels=4, cls_dim=768, z_dims=(768,))
    assert io["redi"] == dict(input_size=H, in_channels=12, cls_dim=None, z_dims=())
    assert io["reglue"] == dict(input_size=H, in_channels=20, cls_dim=768, z_dims=(768,))
    assert METHODS["reglue"].compressor_channel_list(768) == [3072, 256, 16]
    assert get_method("reglue", layers=(11,)).compressor_channel_list(768) == [768, 256, 16]
    with pytest.raises(ValueError, match="compressed channels"):
        sit_io(METHODS["reglue"], **{**dims, "compressed_channels": 0})
    with pytest.raises(ValueError, match="unknown method"):
        get_method("dit")


def test_lambda_schedule_is_explicit():
    xl = get_method("reglue", lam_schedule=XL_LAM_SCHEDULE)
    assert [xl.lam(s) for s in (0, 249_999, 250_000, 499_999, 500_000, 10**7)] == [1, 1, .5, .5, .25, .25]
    assert METHODS["reglue"].lam(10**7) == 1.0
    with pytest.raises(ValueError, match="lam_schedule"):
        Method("x", lam_schedule=((100, 1.0),))
    with pytest.raises(ValueError, match="feature_channels"):
        Method("x", features="pca")


def make_batch(method: Method, batch_size: int = 4) -> Batch:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(batch_size, method.feature_channels, H, H, generator=g) if method.features != "none" else None
    tokens = (H // 2) ** 2 + int(method.cls)
    return Batch(latent=torch.randn(batch_size, ZC, H, H, generator=g), labels=torch.arange(batch_size),
                 features=feats, cls=torch.randn(batch_size, DINO, generator=g) if method.cls else None,
                 repa_target=torch.randn(batch_size, tokens, DINO, generator=g) if method.repa else None)


class Recorded(Draws):
    """The production draws, recorded by role."""

    def __init__(self):
        self.calls = []

    def _keep(self, role, value):
        self.calls.append((role, value))
        return value

    def posterior(self, mean):
        return self._keep("posterior", super().posterior(mean))

    def time(self, shape):
        return self._keep("time", super().time(shape))

    def time_normal(self, shape):
        return self._keep("time_normal", super().time_normal(shape))

    def noise(self, x):
        return self._keep("noise", super().noise(x))

    def noise_cls(self, cls):
        return self._keep("noise_cls", super().noise_cls(cls))

    def label_drop(self, labels):
        return self._keep("label_drop", super().label_drop(labels))


def test_the_step_draws_in_the_reference_order_from_the_global_rng():
    """prepare_batch + loss_terms (model in train()) make the reference's calls on the global RNG, in its
    order: randn_like(mean) (train.py:57), rand((B,1,1,1)) (loss.py:59), randn_like(x), randn_like(cls)
    (loss.py:72-73), rand(B) in the label dropout (sit.py:88)."""
    from types import SimpleNamespace

    from reglue.trainer.data import batch_from_rows

    method = METHODS["reglue"]
    model = build_sit("SiT-tiny/2", num_classes=4, **sit_io(method, latent_channels=ZC, latent_size=H, dino_dim=DINO,
                                                            compressed_channels=16)).train()
    g = torch.Generator().manual_seed(1)
    rows = {"vae_moments": torch.rand(4, 2 * ZC, H, H, generator=g), "labels": torch.arange(4),
            "cls": torch.randn(4, DINO, generator=g), "patches": torch.randn(4, (H // 2) ** 2, DINO, generator=g),
            "compressed": torch.randn(4, 16, H // 2, H // 2, generator=g)}
    meta = SimpleNamespace(vae_scaling_factor=0.18215, num_classes=4, latent_size=H)
    recorded = Recorded()
    torch.manual_seed(7)
    loss_terms(model, batch_from_rows(rows, method, meta, draws=recorded), method, 0, recorded)
    torch.manual_seed(7)
    reference = [torch.randn(4, ZC, H, H), torch.rand((4, 1, 1, 1)), torch.randn(4, ZC + 16, H, H),
                 torch.randn(4, DINO), torch.rand(4)]
    assert [role for role, _ in recorded.calls] == ["posterior", "time", "noise", "noise_cls", "label_drop"]
    for (role, ours), theirs in zip(recorded.calls, reference):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=role)
    lognormal = get_method("reglue", weighting="lognormal")  # loss.py:62 draws randn for log sigma instead
    recorded.calls.clear()
    loss_terms(model, batch_from_rows(rows, lognormal, meta, draws=recorded), lognormal, 0, recorded)
    assert [role for role, _ in recorded.calls][:3] == ["posterior", "time_normal", "noise"]


def test_batch_must_match_the_method():
    method = METHODS["reglue"]
    model = build_sit("SiT-tiny/2", num_classes=4, **sit_io(method, latent_channels=ZC, latent_size=H, dino_dim=DINO,
                                                            compressed_channels=16))
    batch = make_batch(method)
    batch.cls = None
    with pytest.raises(ValueError, match="needs batch.cls"):
        loss_terms(model, batch, method, 0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_decreases_when_overfitting_one_batch(name):
    method = METHODS[name]
    torch.manual_seed(0)
    model = build_sit("SiT-tiny/2", num_classes=4, class_dropout_prob=0.0,
                      **sit_io(method, latent_channels=ZC, latent_size=H, dino_dim=DINO,
                               compressed_channels=method.feature_channels))
    batch = make_batch(method)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0)
    history = []
    for step in range(40):
        torch.manual_seed(1)  # the same t and noise every step: a deterministic regression target
        terms = loss_terms(model, batch, method, step)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in terms.items()})
    first, last = history[0], history[-1]
    assert last["loss"] < first["loss"] - 0.3 * abs(first["loss"]), (first, last)
    assert last["latent"] < 0.7 * first["latent"]
    for term, on in (("feature", method.features != "none"), ("cls", method.cls), ("proj", method.repa)):
        assert (last[term] < first[term]) if on else (first[term] == last[term] == 0.0), (term, first, last)
