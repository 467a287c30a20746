"""SiT: parameter counts, the generalised configurations, resolution, label dropout."""

import pytest
import torch
from golden_models import one_thread  # noqa: F401  (autouse: one intra-op thread)
from typer.testing import CliRunner

from reglue.cli import app
from reglue.trainer.models import SIT_PRESETS, SiT, build_sit, count_parameters, sit_kwargs_from_reference

REGLUE_IO = dict(in_channels=20, z_dims=(768,), cls_dim=768)  # train.py:165-170 with 16 feature channels


def test_parameter_counts_match_the_reference():
    # reference-implementation.md §4.1 (incl. the frozen pos_embed): B/2 139.1 M, XL/2 685.2 M.
    assert count_parameters("SiT-B/2", **REGLUE_IO) == 139_126_864
    assert count_parameters("SiT-XL/2", **REGLUE_IO) == 685_164_880
    # Plain SiT-S/2 builds (the reference's S presets cannot: decoder_hidden_size 768 vs hidden 384).
    assert 30e6 < count_parameters("SiT-S/2") < 40e6


def test_models_command_prints_the_counts():
    result = CliRunner().invoke(app, ["models", "--method", "reglue"])
    assert result.exit_code == 0, result.output
    assert "139,126,864" in result.output and "685,164,880" in result.output
    assert all(name in result.output for name in SIT_PRESETS)


def tiny(**kwargs) -> SiT:
    torch.manual_seed(0)
    model = build_sit("SiT-tiny/2", num_classes=10, **kwargs)
    for p in model.parameters():  # wake the zero-initialised adaLN and output layers
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    return model


def test_plain_sit_has_no_cls_or_projector():
    model = tiny(input_size=8, in_channels=4)
    keys = set(model.state_dict())
    assert not any(k.startswith(("cls_projectors2", "wg_norm", "projectors", "final_layer.linear_cls")) for k in keys)
    assert model.pos_embed.shape == (1, 16, 32)  # no CLS row
    out, zs, cls = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    assert out.shape == (2, 4, 8, 8) and zs == [] and cls is None
    with pytest.raises(ValueError, match="cls_dim=None"):
        model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]), cls_token=torch.randn(2, 16))


@pytest.mark.parametrize("input_size", [32, 64])  # 256 and 512 px
def test_resolution_generic(input_size):
    model = tiny(input_size=input_size, in_channels=6, cls_dim=16, z_dims=(16,)).eval()
    tokens = 1 + (input_size // 2) ** 2
    assert model.pos_embed.shape == (1, tokens, 32) and not model.pos_embed[0, 0].any()  # zero CLS row
    out, zs, cls = model(torch.randn(1, 6, input_size, input_size), torch.rand(1), torch.tensor([3]),
                         cls_token=torch.randn(1, 16))
    assert out.shape == (1, 6, input_size, input_size) and zs[0].shape == (1, tokens, 16) and cls.shape == (1, 16)
    with pytest.raises(ValueError, match="pass cls_token"):
        model(torch.randn(1, 6, input_size, input_size), torch.rand(1), torch.tensor([3]))


def test_label_dropout_uses_the_null_class_in_train_mode_only():
    model = tiny(input_size=8, in_channels=4, class_dropout_prob=1.0)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    dropped = model.train()(x, t, torch.tensor([1, 2]))[0]
    null = model.eval()(x, t, torch.tensor([10, 10]))[0]
    kept = model.eval()(x, t, torch.tensor([1, 2]))[0]
    torch.testing.assert_close(dropped, null)
    assert not torch.allclose(kept, null)


def test_reference_kwargs_mapping():
    kw = sit_kwargs_from_reference(dict(hidden_size=40, decoder_hidden_size=40, z_dims=[32], fused_attn=False,
                                        qk_norm=False, path_type="linear", use_cfg=True))
    assert kw == dict(hidden_size=40, z_dims=(32,), cls_dim=32, qk_norm=False)
    with pytest.raises(ValueError, match="decoder_hidden_size"):
        sit_kwargs_from_reference(dict(hidden_size=384, decoder_hidden_size=768))


def test_qk_norm_is_timms_attention_with_layer_norm():
    """qk_norm=True (sit.py:113-115): timm's Attention(qk_norm=True) with the nn.LayerNorm of the timm the
    reference pins; same keys, same output."""
    from timm.layers import Attention as TimmAttention

    from reglue.trainer.models import Attention

    torch.manual_seed(0)
    theirs = TimmAttention(32, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p)
    ours = Attention(32, 4, qk_norm=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    keys = tiny(qk_norm=True).state_dict().keys()
    assert "blocks.0.attn.q_norm.weight" in keys and "blocks.0.attn.k_norm.bias" in keys
    assert not any("q_norm" in k for k in tiny().state_dict())
