"""Golden runner for the whole training step (registered into `golden.RUNNERS`).

`train_steps` runs K optimizer steps of `reglue train`'s own step: `batch_from_rows` (the posterior
sample, the REPA target, the upsampled features: `prepare_batch` after the cache's decoding),
`loss_terms`, the optimizer `make_optimizer` builds from a TrainConfig, `train_step` (backward,
`clip_grad_norm_`, AdamW) and the EMA update, with every draw served from the case through the
production seam (trainer.draws; golden.Replay checks the order).
"""

import fnmatch
import re
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from golden import Case, Replay, runner
from golden_models import REFERENCE_LATENT_CHANNELS, reference_method, reference_sit

from reglue.trainer.data import batch_from_rows
from reglue.trainer.ema import EMA
from reglue.trainer.loop import TERMS, Plan, TrainConfig, make_optimizer, resolve_recipe, train_step
from reglue.trainer.objective import Method

# train.py's logged names of our TERMS (train.py:348-358)
REFERENCE_TERMS = {"loss": "loss", "latent": "loss_mean", "feature": "dino_loss_mean", "cls": "loss_mean_cls",
                   "proj": "proj_loss_mean"}
PRECISION = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}  # train.py --mixed-precision -> TrainConfig.precision


@contextmanager
def cpu_accelerator(mixed_precision: str):
    """An Accelerator on the CPU (the vectors are CPU runs), with accelerate's process-wide state reset
    around it so that other tests' accelerators (another device or precision) do not clash with it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    try:
        yield Accelerator(cpu=True, mixed_precision=mixed_precision)
    finally:
        reset()


def excluded(case: Case) -> tuple[str, slice, float] | None:
    """(state-key pattern, slice, atol) of `tolerance.exclude`: "blocks.*.attn.qkv.bias[40:80] ... in model
    and ema", compared only with atol = steps * lr (the case's rule, which the text must state); None if none."""
    exclude, args = case.meta["tolerance"].get("exclude"), case.meta["args"]
    if exclude is None:
        return None
    pattern, start, stop = re.match(r"\s*([\w.*]+)\[(\d+):(\d+)\]", exclude["entries"]).groups()
    if "atol" in exclude:
        atol = exclude["atol"]
    else:
        assert re.search(r"atol\s*=\s*steps\s*\*\s*lr", exclude["why"]), f"unknown exclusion rule: {exclude}"
        atol = args["steps"] * args["learning_rate"]
    return pattern, slice(int(start), int(stop)), atol


def compare_state(ours: dict, case: Case, prefix: str, quantity: str) -> dict[str, float]:
    """Every `out.<prefix>.*` entry against ours with the case's `quantity` tolerance, the excluded slice
    with its own atol; returns the worst |ours - reference| of the rest and of the excluded slice."""
    pattern, cut, atol = excluded(case) or ("", slice(0), 0.0)  # no exclusion: the pattern matches no key
    expected = case.state(f"out.{prefix}.")
    assert ours.keys() == expected.keys(), f"{prefix}: {sorted(ours.keys() ^ expected.keys())}"
    worst = {"rest": 0.0, "excluded": 0.0}
    for key, want in expected.items():
        got = ours[key].detach().float()
        if fnmatch.fnmatchcase(key, pattern):
            torch.testing.assert_close(got[cut], want[cut], atol=atol, rtol=0.0,
                                       msg=lambda m, k=key: f"{prefix}.{k}[{cut}]: {m}")
            worst["excluded"] = max(worst["excluded"], (got[cut] - want[cut]).abs().max().item())
            keep = torch.ones(len(want), dtype=torch.bool)
            keep[cut] = False
            got, want = got[keep], want[keep]
        torch.testing.assert_close(got, want, **case.tol(quantity), msg=lambda m, k=key: f"{prefix}.{k}: {m}")
        worst["rest"] = max(worst["rest"], (got - want).abs().max().item())
    return worst


@dataclass
class Replayed:
    """What our step produced on a case: per step the train.py-named outputs, then the final states."""

    steps: list[dict[str, torch.Tensor]]
    """Per step: x_joint, grad_norm and the weighted terms (loss_mean, dino_loss_mean, ...)."""
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    config: TrainConfig
    method: Method


def replay(case: Case) -> Replayed:
    """K steps of the production step on the case's inputs and draws, configured by its `args` alone."""
    args, kwargs = case.meta["args"], case.meta["model"]["constructor_kwargs"]
    steps, first, batch, t = args["steps"], args["first_global_step"], args["batch"], case.tensors
    assert not args.get("legacy", False), "train.py --legacy (a second label drop) is not reglue's step"
    # The run's config as `reglue train` holds it; the optimizer is built from it as the loop builds it.
    cfg = TrainConfig(cache="", out="", model=args["model"], global_batch=batch, max_steps=first + steps,
                      lr=args["learning_rate"], betas=tuple(args["adam_betas"]), adam_eps=args["adam_epsilon"],
                      weight_decay=args["adam_weight_decay"], grad_clip=args["max_grad_norm"],
                      ema_decay=args["ema_decay"], precision=PRECISION[args["mixed_precision"]], seed=case.meta["seed"])
    # args carries the loss's prediction / path_type / weighting too. Its cfg_prob only sets use_cfg
    # (train.py:170, unused by the forward): the model drops labels at its class_dropout_prob (sit.py:88).
    method = reference_method(kwargs["in_channels"], args, args)
    meta = SimpleNamespace(vae_scaling_factor=args["vae_scaling_factor"], num_classes=kwargs["num_classes"],
                           latent_size=kwargs["input_size"])
    model = reference_sit(kwargs, case.model_state()).train()  # train(): the label dropout draws
    plan = Plan(method, resolve_recipe(cfg), kwargs, (), {}, world=1, per_rank=batch, micro=batch, accum=1)
    batches, out = [], []

    def make_batch(rows, draws):  # the loop's prepare_batch from the decoded rows on, recording the batch
        batches.append(batch_from_rows(rows, method, meta, None, draws))
        return batches[-1]

    with cpu_accelerator(args["mixed_precision"]) as accelerator:
        ema = EMA(model, cfg.ema_decay)  # the loop's order: the EMA copies the model, then prepare
        model, optimizer = accelerator.prepare(model, make_optimizer(cfg, model.parameters()))
        bare = accelerator.unwrap_model(model)
        for k in range(steps):
            step = lambda name, k=k: t[f"in.step{k}.{name}"][:batch]  # noqa: E731
            rows = {"vae_moments": step("moments"), "labels": step("labels"), "cls": step("cls").float(),
                    "patches": step("patches").float(), "compressed": step("compressed")}
            draws = Replay(case.meta["random_draws"]["order_per_step"], step)
            terms, grad_norm = train_step(accelerator, model, optimizer, rows, make_batch, plan, cfg.seed,
                                          cfg.grad_clip, first + k, draws)
            ema.update(bare)
            draws.finished()
            out.append({"x_joint": torch.cat([batches[-1].latent, batches[-1].features], dim=1),
                        "grad_norm": grad_norm.reshape(()).detach(),
                        **{REFERENCE_TERMS[n]: v for n, v in zip(TERMS, terms)}})
    assert batches[0].latent.shape[1] == REFERENCE_LATENT_CHANNELS
    return Replayed(out, bare.state_dict(), ema.state_dict(), cfg, method)


QUANTITY = {"x_joint": "x_joint", "grad_norm": "grad_norm"}  # the tolerance entry of each output; the rest: losses


@runner("train_steps")
def run_train_steps(case: Case) -> None:
    ours = replay(case)
    worst: dict[str, float] = {}
    for k, outputs in enumerate(ours.steps):
        for name, value in outputs.items():
            want, quantity = case.tensors[f"out.step{k}.{name}"], QUANTITY.get(name, "losses")
            torch.testing.assert_close(value, want, **case.tol(quantity),
                                       msg=lambda m, n=name, k=k: f"step {k} {n}: {m}")
            worst[quantity] = max(worst.get(quantity, 0.0), (value - want).abs().max().item())
        clipped = case.meta.get("checks", {}).get("grad_norm_clipped_per_step")
        if clipped is not None:
            assert (outputs["grad_norm"].item() > ours.config.grad_clip) == clipped[k], f"step {k}: {outputs}"
    for prefix, state in (("model", ours.model), ("ema", ours.ema)):
        for part, value in compare_state(state, case, prefix, prefix).items():
            worst[f"{prefix} ({part})"] = value
    print(f"train_steps max |ours - reference| per quantity: {worst}")
