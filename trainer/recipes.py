"""Each method's training recipe: how the paper whose number it is compared with trained it.

A `Method` (trainer.objective) says which inputs a SiT sees and which loss terms train it; its `Recipe`
says how the paper's own code ran that training: precision, gradient clipping, horizontal flips, the
DINOv2 its targets came from, and the file:lines it follows (read in the public repositories:
willisma/SiT@947f95b, sihyun-yu/REPA@67f7145, Martinser/REG@021ea2e, zelaki/ReDi@58c65a8,
giorgospets/reglue@90a20d4). `TrainConfig`'s recipe fields default to None = the method's recipe and
override it when set; `reglue train` (and `--dry-run`) prints the resolved recipe in one line, and
docs/models.md tabulates the recipes with every remaining deviation.

What all five share (and is therefore not a recipe field): AdamW lr 1e-4 constant, wd 0, betas
(0.9, 0.999), global batch 256, EMA 0.9999, uniform t, the linear path with v-prediction, 10 % label
dropout, TF32 allowed (SiT train.py:9-10, 181; REPA train.py:200-209; ReDi train_redi.py:9-10, 225;
reference train.py:205-215). The REPA block (`encoder_depth`: 4 for S/B, 8 for L/XL; REG train.sh:16,
reference README:112) and the 3-layer 2048-wide projector (REPA models/sit.py:16-22) come with the
SiT preset (trainer.models).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from reglue.pipeline.store import encoder_record

DINOV2_B = "vit_base_patch14_dinov2.lvd142m"
"""timm's copy of torch.hub `dinov2_vitb14` (no registers): REPA's and REG's target encoder."""
DINOV2_B_REG = "vit_base_patch14_reg4_dinov2.lvd142m"
"""timm's copy of torch.hub `dinov2_vitb14_reg` (4 registers): ReDi's and REGLUE's."""
HUB_NAMES = {DINOV2_B: "dinov2_vitb14", DINOV2_B_REG: "dinov2_vitb14_reg"}


@dataclass(frozen=True)
class Recipe:
    """The training settings of a method's paper, beyond its inputs and loss terms."""

    precision: Literal["bf16", "fp16", "fp32"]
    """Autocast precision of the SiT step: fp32 = no autocast (TF32 allowed), fp16 with a GradScaler, bf16."""
    grad_clip: float | None
    """Max global gradient norm, or None for no clipping (the norm is still measured and logged)."""
    flip: bool
    """Random horizontal flip of the image (p = 1/2, as torchvision RandomHorizontalFlip): each sample of each
    step takes the VAE posterior of its crop or of the mirrored crop (`reglue extract --flip`)."""
    encoder: str | None
    """timm id of the DINOv2 the paper's targets came from; None for a method without DINOv2 inputs."""
    xl_lam_rule: bool = False
    """The paper's code applies trainer.objective.XL_LAM_SCHEDULE to SiT-XL models (REGLUE only)."""
    source: str = ""
    """Where the recipe is written: repository, file:lines."""
    deviations: tuple[str, ...] = ()
    """What reglue does differently from that code (docs/models.md gives each one's effect)."""

    def override(self, *, precision: str | None = None, grad_clip: float | None = None,
                 flip: bool | None = None) -> Recipe:
        """This recipe with the given values in place of its own; None keeps the recipe's, grad_clip 0 = off."""
        if precision is not None and precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be bf16, fp16 or fp32; got {precision!r}")
        if grad_clip is not None and grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 turns clipping off); got {grad_clip}")
        clip = self.grad_clip if grad_clip is None else (grad_clip or None)
        return replace(self, precision=precision or self.precision, grad_clip=clip,
                       flip=self.flip if flip is None else flip)

    def summary(self) -> str:
        """Precision, clipping, flip and encoder, in words."""
        parts = [self.precision if self.precision != "fp32" else "fp32 (no autocast)",
                 f"grad clip {self.grad_clip:g}" if self.grad_clip else "no grad clipping",
                 "random horizontal flip" if self.flip else "no flip"]
        if self.encoder:
            parts.append(f"paper's DINOv2 {HUB_NAMES.get(self.encoder, self.encoder)}")
        return ", ".join(parts)


# The bf16 default of the three fp16 codes is reglue's choice (bf16 has fp32's range, so no GradScaler
# and no skipped steps; REPA issue #46 reports fp16 NaNs); --precision fp16 reproduces them.
BF16 = "bf16 autocast where the paper's code uses fp16 + GradScaler (--precision fp16 reproduces it)"

RECIPES: dict[str, Recipe] = {
    "sit": Recipe(
        precision="fp32", grad_clip=None, flip=True, encoder=None,
        source="willisma/SiT train.py:9-10, 181, 184-189, 245-253",
        deviations=("the flip picks the cached VAE posterior of the crop or of the mirrored crop (extract --flip) "
                    "instead of encoding the flipped image each step",
                    "t = 0 is data (REPA's convention) where SiT's t = 1 is data (transport/path.py:18-29): the same "
                    "uniform law, the time embedding sees 1 - t",
                    "no learn_sigma output half (SiT models.py:157-162, 245-246 discards it: no gradient reaches it)")),
    "repa": Recipe(
        precision="bf16", grad_clip=1.0, flip=False, encoder=DINOV2_B,
        source="sihyun-yu/REPA train.py:298-303, 306-319, 400, 411, 423, 436; utils.py:88-93",
        deviations=(BF16,)),
    "reg": Recipe(
        precision="bf16", grad_clip=1.0, flip=False, encoder=DINOV2_B,
        source="Martinser/REG train.sh:8, 16; train.py:301-308, 313-330, 420, 433-436; utils.py:88-101",
        deviations=(BF16,)),
    "redi": Recipe(
        precision="fp32", grad_clip=None, flip=False, encoder=DINOV2_B_REG,
        source="zelaki/ReDi train_redi.py:9-10, 225, 228-235, 276-311, 320-340; calc_pca.py:127-179",
        deviations=("the PCA input is the cache's last-layer tokens (DINOv2 in fp16 autocast on CUDA unless "
                    "extract --precision fp32, int8-encoded) where ReDi runs DINOv2 in fp32",
                    "representation dropout is drawn once per micro-batch (ReDi: once per GPU batch)")),
    "reglue": Recipe(
        precision="bf16", grad_clip=1.0, flip=False, encoder=DINOV2_B_REG, xl_lam_rule=True,
        source="giorgospets/reglue train.sh:4-5; train.py:205-215, 319-340, 348-367",
        deviations=(BF16, "the XL lambda schedule is opt-in (--xl-lam-schedule)")),
}


def get_recipe(method: str) -> Recipe:
    """The recipe of a method preset (trainer.objective.METHODS)."""
    if method not in RECIPES:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(RECIPES)}")
    return RECIPES[method]


def cache_encoder(meta) -> str | None:
    """The timm id of the DINOv2 a cache's targets came from, as `reglue extract` records it (meta.encoders)."""
    return encoder_record(meta.encoders).get("name")


def encoder_note(method_name: str, recipe: Recipe, meta, uses_dino: bool) -> str | None:
    """One line when the cache's DINOv2 differs from the one the method's paper used (None otherwise)."""
    have = cache_encoder(meta)
    if not uses_dino or recipe.encoder is None or have is None or have == recipe.encoder:
        return None
    return (f"note: method {method_name}'s paper used DINOv2 {HUB_NAMES[recipe.encoder]} ({recipe.encoder}); this "
            f"cache holds {HUB_NAMES.get(have, have)} ({have}) targets. To match the paper, extract a cache with "
            f"`reglue extract SRC --out NEW --encoder {recipe.encoder}`")
