"""Golden runners for the models area (registered into `golden.RUNNERS`), and a fixture its tests share."""

import pytest
import torch
from golden import Case, Replay, runner

from reglue.pipeline.compressor import EncoderDecoder
from reglue.trainer.models import SiT, build_sit, sit_kwargs_from_reference
from reglue.trainer.objective import Batch, get_method, loss_terms, per_sample_losses, reference_lam_schedule


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and ~20x faster on a busy 2-core machine.
    Import it into a test module (`from golden_models import one_thread`) to apply it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def inputs(case: Case) -> dict[str, torch.Tensor]:
    """`in.*` tensors, float16 upcast to the float32 the reference received."""
    return {k[3:]: v.float() if v.dtype == torch.float16 else v
            for k, v in case.tensors.items() if k.startswith("in.")}


def close(actual: torch.Tensor, case: Case, name: str) -> None:
    torch.testing.assert_close(actual, case.tensors[f"out.{name}"], **case.tol(), msg=lambda m: f"out.{name}: {m}")


def reference_sit(kwargs: dict, state: dict) -> SiT:
    model = SiT(**sit_kwargs_from_reference(kwargs))
    # Our fixed sin-cos table, zero CLS row included, is the reference's (it is not a learned weight).
    torch.testing.assert_close(model.pos_embed.data, state["pos_embed"], rtol=0, atol=1e-6)
    model.load_state_dict(state, strict=True)
    return model.eval()


@runner("sit_forward")
def sit_forward(case: Case) -> None:
    model = reference_sit(case.meta["constructor"]["kwargs"], case.state())
    x = inputs(case)
    with torch.no_grad():
        out, zs, cls = model(x["x"], x["t"], x["y"], cls_token=x["cls_token"])
    close(out, case, "x")
    close(zs[0], case, "zs0")
    close(cls, case, "cls")


def reference_method(in_channels: int, args: dict, loss_kwargs: dict):
    """The reglue Method of a reference run: REGLUE with the run's feature channels (the input channels
    after the reference's 4 latent ones, train.py:169), loss weights, path, weighting and lambda schedule
    (the XL rule by the model name, train.py:349-354)."""
    assert loss_kwargs.get("prediction", "v") == "v", "the reference supports v-prediction only (loss.py:79-83)"
    return get_method("reglue", feature_channels=in_channels - REFERENCE_LATENT_CHANNELS,
                      lam_schedule=reference_lam_schedule(args["model"], args["lam"]), w_cls=args["cls"],
                      w_proj=args["proj_coeff"], path=loss_kwargs.get("path_type", "linear"),
                      weighting=loss_kwargs.get("weighting", "uniform"))


REFERENCE_LATENT_CHANNELS = 4  # loss.py:89-90 and train.py:169 hard-code the SD-VAE's 4 channels


@runner("siloss")
def siloss(case: Case) -> None:
    model = reference_sit(case.meta["model"]["constructor_kwargs"], case.model_state())
    x = inputs(case)
    combination = case.meta["combination"]
    args = combination["args"]
    method = reference_method(x["images"].shape[1], args, case.meta["loss_constructor"]["kwargs"])
    if "effective_lambda" in combination:
        assert method.lam(args["global_step"]) == combination["effective_lambda"], (method, args)
    zc = REFERENCE_LATENT_CHANNELS
    batch = Batch(latent=x["images"][:, :zc], features=x["images"][:, zc:], cls=x["cls_token"],
                  repa_target=x["zs_target"], labels=x["labels"])
    replay = lambda: Replay(case.meta["random_draws"]["order"], case.tensors.__getitem__)  # noqa: E731
    with torch.no_grad():
        per = per_sample_losses(model, batch, method, draws := replay())
        draws.finished()
        terms = loss_terms(model, batch, method, args["global_step"], draws := replay())
        draws.finished()
    for ours, theirs in (("latent", "denoising_loss"), ("feature", "dino_loss"), ("cls", "denoising_loss_cls"),
                         ("proj", "proj_loss")):
        close(per[ours], case, theirs)
    for ours, theirs in (("latent", "loss_mean"), ("feature", "dino_loss_mean"), ("proj", "proj_loss_mean"),
                         ("cls", "loss_mean_cls"), ("loss", "loss_total")):
        close(terms[ours], case, theirs)


@runner("compressor")
def compressor(case: Case) -> None:
    model = EncoderDecoder(**case.meta["constructor"]["kwargs"])
    model.load_state_dict(case.state(), strict=True)
    model.eval()
    with torch.no_grad():
        latent = model.encoder(inputs(case)["x"])
        close(latent, case, "latent")
        close(model.decoder(latent), case, "reconstructed")
    real = case.meta.get("real_size_checkpoint")
    if real is None:
        return
    with torch.device("meta"):
        big = EncoderDecoder(real["build_channel_list"])
    assert [(f"module.{k}", list(v.shape)) for k, v in big.state_dict().items()] == \
        [(k["key"], k["shape"]) for k in real["keys"]]
    assert sum(p.numel() for p in big.parameters()) == real["num_parameters"]
    assert sum(p.numel() for p in big.encoder.parameters()) == real["num_encoder_parameters"]


@runner("checkpoint_keys")
def checkpoint_keys(case: Case) -> None:
    for released in case.meta["models"]:
        with torch.device("meta"):
            model = build_sit(released["model"], **sit_kwargs_from_reference(released["kwargs"]))
        keys = [(k, list(v.shape)) for k, v in model.state_dict().items()]
        assert keys == [(k["key"], k["shape"]) for k in released["keys"]], released["model"]
        params = list(model.parameters())
        assert sum(p.numel() for p in params) == released["num_parameters"]
        assert sum(p.numel() for p in params if p.requires_grad) == released["num_trainable_parameters"]
