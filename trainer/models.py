"""SiT with REGLUE's entanglement: one DiT-style file that loads the official checkpoints strictly.

The reference model is `models/sit.py` of giorgospets/reglue (byte-identical to REG's), which is
REPA's SiT plus a noisy DINOv2 [CLS] token. State-dict keys equal the reference's, so the released
checkpoints load with no mapping. Generalised so that one class serves all five methods:
`cls_dim=None` drops the CLS token (sit, repa, redi) and `z_dims=()` drops the REPA projector
(sit, redi); with both off the keys are those of the original SiT, with only the CLS off REPA's.

Conventions (reference-implementation.md §4): t is fed raw in [0, 1] (t=0 data, t=1 noise), with
no x1000; the input is the VAE latent channel-concatenated with the semantic features; the CLS
token is prepended with a zero position embedding; the projector reads block `encoder_depth`
(1-indexed) on all tokens including the CLS slot.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from reglue.trainer.draws import RANDOM, Draws


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA's 3-layer projector; keys `{0,2,4}` (reference sit.py:16-23)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


# ---- embedding layers ---------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches to tokens (timm PatchEmbed without a norm; key `proj`)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, T, D)


class TimestepEmbedder(nn.Module):
    """Sinusoid of the raw t in [0, 1] (GLIDE frequencies, max period 1e4), then an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2  # dim is even (256); the reference's odd-dim pad never runs
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None].to(t.device)  # (N, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.sinusoid(t, self.frequency_embedding_size).to(t.dtype)  # (N, 256)
        return self.mlp(freq)  # (N, D)


class LabelEmbedder(nn.Module):
    """Class embedding with label dropout for CFG; the null id is `num_classes` (sit.py:72-99)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor, train: bool, draws: Draws = RANDOM) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = draws.label_drop(labels) < self.dropout_prob  # (N,): torch.rand(N) < p, sit.py:88
            labels = torch.where(drop, self.num_classes, labels)  # (N,)
        return self.embedding_table(labels)  # (N, D)


# ---- transformer ------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention through SDPA (flash kernels on GPU); keys as timm's `qkv`, `proj`
    (and `q_norm`, `k_norm` with `qk_norm`: a LayerNorm over each head's queries and keys, timm's
    `Attention(qk_norm=True)` with its default nn.LayerNorm, reference sit.py:113-115).

    The reference uses timm Attention with `fused_attn` on in training and off in sampling; the
    golden `sit_forward` (manual softmax) agrees with SDPA within its 5e-5 tolerance.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, S, D = x.shape
        qkv = self.qkv(x).reshape(N, S, 3, self.num_heads, D // self.num_heads)  # (N, S, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, S, D/H)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, S, D/H)
        return self.proj(x.transpose(1, 2).reshape(N, S, D))  # (N, S, D)


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> fc2 (timm Mlp keys)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (N, S, D) -> (N, S, 4D) -> (N, S, D)


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on c = t_emb + y_emb."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mods = self.adaLN_modulation(c).chunk(6, dim=-1)  # 6 x (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, S, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, S, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then patch pixels from the image tokens and the CLS from token 0."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, cls_dim: int | None):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.linear_cls = nn.Linear(hidden_size, cls_dim) if cls_dim is not None else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 x (N, D)
        x = modulate(self.norm_final(x), shift, scale)  # (N, S, D)
        if self.linear_cls is None:
            return self.linear(x), None  # (N, T, p*p*C)
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])  # (N, T, p*p*C), (N, cls_dim)


# ---- SiT --------------------------------------------------------------------------------------

class SiT(nn.Module):
    """Scalable interpolant transformer over [latent | features] with an optional noisy CLS token."""

    def __init__(
        self,
        *,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        z_dims: tuple[int, ...] = (),
        projector_dim: int = 2048,
        encoder_depth: int = 8,
        cls_dim: int | None = None,
        qk_norm: bool = False,
    ):
        super().__init__()
        if input_size % patch_size or hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"SiT needs input_size % patch_size == 0 and hidden_size divisible by "
                             f"num_heads and 4; got {input_size=}, {patch_size=}, {hidden_size=}, {num_heads=}")
        if z_dims and not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in 1..{depth} (block whose output REPA aligns); "
                             f"got {encoder_depth}")
        self.in_channels = self.out_channels = in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.z_dims = tuple(z_dims)
        self.encoder_depth = encoder_depth
        self.cls_dim = cls_dim
        self.grid = input_size // patch_size
        extra = int(cls_dim is not None)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos table; a frozen Parameter (not a buffer) as in the reference, so that the
        # parameter counts and the EMA's named_parameters match it (sit.py:208).
        self.pos_embed = nn.Parameter(torch.zeros(1, extra + self.grid ** 2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z) for z in self.z_dims])
        # One width: the reference's separate decoder_hidden_size must equal hidden_size, and its S
        # presets leave it at the default 768 against hidden 384, so their forward fails (sit.py:404-411).
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, cls_dim)
        if cls_dim is not None:
            self.cls_projectors2 = nn.Linear(cls_dim, hidden_size)
            self.wg_norm = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Reference init (sit.py:227-265): xavier Linears, N(0, .02) embeddings, zeroed adaLN and outputs."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the patch conv initialised as a Linear
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear, self.final_layer.linear_cls):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        table = sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid)  # (T, D)
        extra = self.pos_embed.shape[1] - table.shape[0]
        self.pos_embed.data.copy_(F.pad(table, (0, 0, extra, 0)).unsqueeze(0))  # zero row for the CLS slot

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c, g = self.patch_size, self.out_channels, self.grid
        x = x.reshape(x.shape[0], g, g, p, p, c)  # (N, g, g, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, g, p, g, p)
        return x.reshape(x.shape[0], c, g * p, g * p)  # (N, C, H, W)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cls_token: torch.Tensor | None = None,
        draws: Draws = RANDOM,
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """x (N, C, H, W) noisy [latent | features], t (N,) in [0, 1], y (N,) labels (null id =
        num_classes), cls_token (N, cls_dim) the noisy CLS iff the model has one; `draws` serves the
        label dropout's uniforms in train() mode (trainer.draws).
        Returns (velocity (N, C, H, W), projector outputs [(N, S, z)], CLS velocity (N, cls_dim) or None)."""
        if (cls_token is None) != (self.cls_dim is None):
            raise ValueError(f"this SiT was built with cls_dim={self.cls_dim}; pass cls_token "
                             f"{'(N, cls_dim)' if self.cls_dim else '=None'}")
        x = self.x_embedder(x)  # (N, T, D), T = (H / p)^2
        if cls_token is not None:
            cls = self.wg_norm(self.cls_projectors2(cls_token))  # (N, D)
            x = torch.cat([cls.unsqueeze(1), x], dim=1)  # (N, S, D), S = 1 + T
        x = x + self.pos_embed  # (N, S, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, draws)  # (N, D)
        zs: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, c)  # (N, S, D)
            if i == self.encoder_depth:
                zs = [projector(x) for projector in self.projectors]  # [(N, S, z_dim)]
        x, cls_out = self.final_layer(x, c)  # (N, T, p*p*C), (N, cls_dim) or None
        return self.unpatchify(x), zs, cls_out  # (N, C, H, W), [(N, S, z)], (N, cls_dim) or None


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table (T, dim), computed in float64 like the reference's numpy.

    First half of the channels encodes the column, second half the row (MAE's meshgrid puts w first).
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")  # (g, g) each

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]  # (T, D/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (T, D/2)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()  # (T, D)


# ---- presets ----------------------------------------------------------------------------------

def _preset(depth: int, hidden_size: int, num_heads: int, patch_size: int, encoder_depth: int,
            projector_dim: int = 2048) -> dict:
    return dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size,
                encoder_depth=encoder_depth, projector_dim=projector_dim)


# Widths from sit.py:377-419 (DiT's table). encoder_depth is the block REPA aligns: 4 for S and B
# (REGLUE README:112), 8 for L and XL (train.sh; REPA). Override it with build_sit(..., encoder_depth=).
SIT_PRESETS: dict[str, dict] = {
    **{f"SiT-XL/{p}": _preset(28, 1152, 16, p, 8) for p in (2, 4, 8)},
    **{f"SiT-L/{p}": _preset(24, 1024, 16, p, 8) for p in (2, 4, 8)},
    **{f"SiT-B/{p}": _preset(12, 768, 12, p, 4) for p in (2, 4, 8)},
    **{f"SiT-S/{p}": _preset(12, 384, 6, p, 4) for p in (2, 4, 8)},
    "SiT-tiny/2": _preset(2, 32, 2, 2, 1, projector_dim=64),  # for tests and the CPU demo only
}


def preset_kwargs(preset: str) -> dict:
    """A copy of a preset's SiT kwargs (widths, depth, heads, patch, encoder_depth, projector_dim)."""
    if preset not in SIT_PRESETS:
        raise ValueError(f"unknown SiT preset {preset!r}; choose from {sorted(SIT_PRESETS)}")
    return dict(SIT_PRESETS[preset])


def build_sit(preset: str, **kwargs) -> SiT:
    """`SiT(**SIT_PRESETS[preset], **kwargs)`; kwargs (input/cls/feature dims) override the preset."""
    return SiT(**{**preset_kwargs(preset), **kwargs})


def count_parameters(preset: str, **kwargs) -> int:
    """Parameters (incl. the frozen pos_embed, as the paper's counts) of a preset, built on `meta`."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_sit(preset, **kwargs).parameters())


def preset_table(**kwargs) -> str:
    """One line per preset: its widths and parameter count with `kwargs` (input/cls/feature dims)."""
    lines = [f"{'preset':<12}{'depth':>6}{'hidden':>7}{'heads':>6}{'patch':>6}{'enc':>5}{'parameters':>15}"]
    for name, p in SIT_PRESETS.items():
        lines.append(f"{name:<12}{p['depth']:>6}{p['hidden_size']:>7}{p['num_heads']:>6}{p['patch_size']:>6}"
                     f"{kwargs.get('encoder_depth', p['encoder_depth']):>5}{count_parameters(name, **kwargs):>15,}")
    return "\n".join(lines)


# The reference constructor's kwargs that have no effect on the network (train.py:161-170).
_REFERENCE_ONLY = ("path_type", "use_cfg", "fused_attn", "decoder_hidden_size", "cls_token_dim")


def sit_kwargs_from_reference(kwargs: dict) -> dict:
    """Map the reference's SiT kwargs (case.json, a checkpoint's args) to ours.

    The reference always has the CLS token, of width z_dims[0] (sit.py:217-219)."""
    hidden = kwargs.get("hidden_size")
    if kwargs.get("decoder_hidden_size", hidden) != hidden:
        raise ValueError(f"decoder_hidden_size must equal hidden_size ({kwargs['decoder_hidden_size']} != {hidden})")
    out = {k: v for k, v in kwargs.items() if k not in _REFERENCE_ONLY}
    out["z_dims"] = tuple(out.get("z_dims", (768,)))
    out["cls_dim"] = out["z_dims"][0]
    return out
