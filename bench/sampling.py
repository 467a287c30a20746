"""Sampling throughput: our SDE sampler against a reference-style one, and bf16 vs fp32 deviation.

Variants, all the same 250-step Euler-Maruyama SDE with CFG 2.3, CLS-CFG 2.3, guidance t <= 0.9:
- `baseline`: fp32 (TF32 on, as the reference's generate.py), non-fused attention (the reference's
  `fused_attn=False` at sampling: explicit softmax(q k^T) v), cond and uncond as two forwards, one
  global `randn_like` per draw;
- `reference`: as baseline but cond/uncond batched in one forward (what samplers.py actually does);
- `ours-fp32`: our sampler (batched guidance, SDPA attention, per-sample generators), TF32 on;
- `ours-bf16`: the same with bf16 autocast on the model.
Random-weight REGLUE models (20 input channels, CLS 768, REPA head). Timing runs `--steps` steps and
reports images/s scaled to 250 steps by model forwards. The deviation table compares final latents
and decoded-size uint8 images of bf16 vs fp32 from the same noise.

    python bench/sampling.py --device cuda --models SiT-B/2 SiT-XL/2 --steps 50 --batch 64
    python bench/sampling.py --smoke            # CPU: SiT-tiny/2 at latent 8, a few steps
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from reglue.trainer import models
from reglue.trainer.generate import PerSampleNoise, sample_generator
from reglue.trainer.sampling import SamplerConfig, euler_maruyama, sde_time_grid


def build(preset: str, input_size: int, cls_dim: int, device: str):
    torch.manual_seed(0)
    model = models.build_sit(preset, input_size=input_size, in_channels=20, num_classes=1000, cls_dim=cls_dim,
                             z_dims=(cls_dim,))
    with torch.no_grad():
        for p in model.parameters():  # off the zero init of the output layers
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return model.eval().to(device)


def unfused_attention(self, x):
    """timm Attention with fused_attn=False (the reference at sampling), same weights."""
    n, s, d = x.shape
    q, k, v = self.qkv(x).reshape(n, s, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * (d // self.num_heads) ** -0.5) @ k.transpose(-2, -1)
    return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(n, s, d))


class Unbatched(torch.nn.Module):
    """Wraps a model so that a [cond; uncond] batch runs as two forwards (unbatched guidance)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.num_classes = model, model.num_classes

    def forward(self, x, t, y, cls_token=None):
        if len(x) == 1 or not (y == self.num_classes).any():
            return self.model(x, t, y, cls_token=cls_token)
        halves = zip(x.chunk(2), t.chunk(2), y.chunk(2), cls_token.chunk(2))
        outs = [self.model(a, b, c, cls_token=d) for a, b, c, d in halves]
        return torch.cat([o[0] for o in outs]), [], torch.cat([o[2] for o in outs])


def forwards(steps: int, cfg: SamplerConfig) -> int:
    return sum(2 if cfg.guided_at(t) else 1 for t in sde_time_grid(steps)[:-1].tolist())


def run(model, variant: str, batch: int, steps: int, device: str) -> tuple[float, torch.Tensor]:
    cfg = SamplerConfig(num_steps=steps, precision="bf16" if variant == "ours-bf16" else "fp32")
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, 20, model.grid * model.patch_size, model.grid * model.patch_size, generator=g, device=device)
    cls, y = torch.randn(batch, model.cls_dim, generator=g, device=device), torch.arange(batch, device=device) % 1000
    ours = variant.startswith("ours")
    torch.manual_seed(1)  # the global stream randn_like draws from: the same for baseline and reference
    noise = PerSampleNoise([sample_generator(0, i, device) for i in range(batch)]) if ours else torch.randn_like
    net = model if variant != "baseline" else Unbatched(model)
    original = models.Attention.forward
    models.Attention.forward = original if ours else unfused_attention
    try:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = euler_maruyama(net, x, y, cls, cfg, noise=noise)[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out
    finally:
        models.Attention.forward = original


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=["SiT-B/2", "SiT-XL/2"])
    ap.add_argument("--steps", type=int, default=50, help="steps timed (images/s is scaled to 250)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: SiT-tiny/2, latent 8, batch 4, 50 steps")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.models, args.steps, args.batch = "cpu", ["SiT-tiny/2"], 50, 4
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # the reference's default
    size, cls_dim = (8, 16) if args.smoke else (32, 768)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    scale = forwards(args.steps, SamplerConfig(num_steps=args.steps)) / forwards(250, SamplerConfig())
    print(f"# {name}; batch {args.batch}; {args.steps} steps timed, images/s scaled to 250 steps "
          f"(474 forwards) by forward count; torch {torch.__version__}")
    print("| model | variant | s / batch (timed) | images/s @250 steps | vs baseline |")
    print("|---|---|---|---|---|")
    for preset in args.models:
        model = build(preset, size, cls_dim, args.device)
        results, base = {}, None
        for variant in ("baseline", "reference", "ours-fp32", "ours-bf16"):
            run(model, variant, args.batch, 2, args.device)  # warm-up (kernels, allocator, autocast)
            seconds, results[variant] = run(model, variant, args.batch, args.steps, args.device)
            ips = args.batch / (seconds / scale)
            base = base or ips
            print(f"| {preset} | {variant} | {seconds:.3g} | {ips:.3g} | {ips / base:.2f}x |", flush=True)
        a, b = results["ours-fp32"], results["ours-bf16"]
        rel = ((b - a).norm() / a.norm()).item()
        lat = (1 - F.cosine_similarity(a.flatten(1), b.flatten(1))).max().item()
        ref_dev = ((results["reference"] - results["baseline"]).norm() / results["baseline"].norm()).item()
        print(f"| {preset} | bf16 vs fp32 final x0 | rel L2 {rel:.2e} | max 1-cosine {lat:.1e} | "
              f"(batched vs unbatched fp32: rel L2 {ref_dev:.1e}) |")


if __name__ == "__main__":
    main()
