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
from types import SimpleNamespace

import torch
from golden import Case, Replay, runner
from golden_models import REFERENCE_LATENT_CHANNELS, reference_method, reference_sit

from reglue.trainer.data import batch_from_rows
from reglue.trainer.ema import EMA
from reglue.trainer.loop import TERMS, Plan, TrainConfig, make_optimizer, train_step

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


def excluded(case: Case) -> tuple[str, slice, float]:
    """(state-key pattern, slice, atol) of `tolerance.exclude`: "blocks.*.attn.qkv.bias[40:80] ... in model
    and ema", compared only with atol = steps * lr (the case's rule, which the text must state)."""
    exclude, args = case.meta["tolerance"]["exclude"], case.meta["args"]
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
    pattern, cut, atol = excluded(case)
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


@runner("train_steps")
def run_train_steps(case: Case) -> None:
    args, kwargs = case.meta["args"], case.meta["model"]["constructor_kwargs"]
    steps, first, t = args["steps"], args["first_global_step"], case.tensors
    assert not args.get("legacy", False), "train.py --legacy (a second label drop) is not reglue's step"
    # The run's config as `reglue train` holds it; the optimizer is built from it as the loop builds it.
    cfg = TrainConfig(cache="", out="", model=args["model"], global_batch=args["batch"], max_steps=first + steps,
                      lr=args["learning_rate"], betas=tuple(args["adam_betas"]), adam_eps=args["adam_epsilon"],
                      weight_decay=args["adam_weight_decay"], grad_clip=args["max_grad_norm"],
                      ema_decay=args["ema_decay"], precision=PRECISION[args["mixed_precision"]], seed=case.meta["seed"])
    # args carries the loss's prediction / path_type / weighting too. Its cfg_prob only sets use_cfg
    # (train.py:170, unused by the forward): the model drops labels at its class_dropout_prob (sit.py:88).
    method = reference_method(kwargs["in_channels"], args, args)
    meta = SimpleNamespace(vae_scaling_factor=args["vae_scaling_factor"], num_classes=kwargs["num_classes"],
                           latent_size=kwargs["input_size"])
    model = reference_sit(kwargs, case.model_state()).train()  # train(): the label dropout draws
    plan = Plan(method, kwargs, (), {}, world=1, per_rank=cfg.global_batch, micro=cfg.global_batch, accum=1)
    batches = []

    def make_batch(rows, draws):  # the loop's prepare_batch from the decoded rows on, recording the batch
        batches.append(batch_from_rows(rows, method, meta, None, draws))
        return batches[-1]

    worst: dict[str, float] = {}
    with cpu_accelerator(args["mixed_precision"]) as accelerator:
        ema = EMA(model, cfg.ema_decay)  # the loop's order: the EMA copies the model, then prepare
        model, optimizer = accelerator.prepare(model, make_optimizer(cfg, model.parameters()))
        bare = accelerator.unwrap_model(model)
        for k in range(steps):
            rows = {"vae_moments": t[f"in.step{k}.moments"], "labels": t[f"in.step{k}.labels"],
                    "cls": t[f"in.step{k}.cls"].float(), "patches": t[f"in.step{k}.patches"].float(),
                    "compressed": t[f"in.step{k}.compressed"]}
            draws = Replay(case.meta["random_draws"]["order_per_step"], lambda name, k=k: t[f"in.step{k}.{name}"])
            terms, grad_norm = train_step(accelerator, model, optimizer, rows, make_batch, plan, cfg.seed,
                                          cfg.grad_clip, first + k, draws)
            ema.update(bare)
            draws.finished()
            quantities = {"x_joint": (torch.cat([batches[-1].latent, batches[-1].features], dim=1), "x_joint"),
                          "grad_norm": (grad_norm.reshape(()), "grad_norm"),
                          **{REFERENCE_TERMS[n]: (v, "losses") for n, v in zip(TERMS, terms)}}
            for name, (ours, quantity) in quantities.items():
                want = t[f"out.step{k}.{name}"]
                torch.testing.assert_close(ours.detach(), want, **case.tol(quantity),
                                           msg=lambda m, n=name, k=k: f"step {k} {n}: {m}")
                worst[quantity] = max(worst.get(quantity, 0.0), (ours.detach() - want).abs().max().item())
            clipped = case.meta.get("checks", {}).get("grad_norm_clipped_per_step")
            if clipped is not None:
                assert (grad_norm.item() > cfg.grad_clip) == clipped[k], f"step {k}: grad norm {grad_norm.item()}"
        for prefix in ("model", "ema"):
            for part, value in compare_state(bare.state_dict() if prefix == "model" else ema.state_dict(), case,
                                             prefix, prefix).items():
                worst[f"{prefix} ({part})"] = value
    assert len(batches) == steps and batches[0].latent.shape[1] == REFERENCE_LATENT_CHANNELS
    print(f"train_steps max |ours - reference| per quantity: {worst}")
