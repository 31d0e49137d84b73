"""``sfda_liu``: SFDA of Liu, Zhang and Wang (CVPR 2021), data-free knowledge transfer + intra-domain patch-level
self-supervision (IPSM).

Networks: the frozen source model ``S``; the target model ``T`` (the student, initialised from ``S``); a generator
``G`` (noise ``z`` -> images); a position-conditioned patch discriminator ``D``; dual attention (spatial ``NxN``
and channel ``DxD``) computed without parameters from the features the classifier consumes (``model.extract``).

Per step, on a batch of unlabelled target crops ``x`` ``(B, 3, H, W)`` and ``Bg`` generated images ``x_g = G(z)``:

- ``L_BNS`` (G): batch mean and variance of the input of *every* BatchNorm layer of ``S`` on ``x_g`` against that
  layer's running statistics, ``sum_l ||mu_l - running_mean_l||_2 + ||var_l - running_var_l||_2`` (the published
  DeepInversion form: L2 norms, summed over layers; :class:`BNStatisticsLoss`);
- ``L_MAE``: mean absolute difference between the logits of ``T`` and ``S`` on ``x_g``;
- ``L_DAD_ss``: L1 between the dual-attention maps of ``T`` and ``S`` on ``x_g``; ``L_DAD_st``: KL from the
  attention of ``T`` on the real target batch (detached) to the attention of ``S`` on ``x_g``;
- ``L_TAR`` (T): MaxSquare on ``T``'s target predictions (Chen et al. 2019), optionally image-wise class-balanced;
- IPSM: ``T``'s softmax output on each target image is cut into ``KxK`` patches; at every patch position the
  batch's patches are ranked by mean entropy, the lower half is *easy*, the upper half *hard*; ``D`` (given the
  patch and its position) learns easy=1 / hard=0 (``L_D``) and ``T`` learns to make hard patches look easy
  (``L_ADV``, non-saturating BCE).

Objectives (published, with alpha=1.0, beta=0.5, tau=beta, gamma=0.01)::

    G minimises  L_BNS - alpha L_MAE - beta L_DAD_ss + tau L_DAD_st
    T minimises  L_TAR + alpha L_MAE + beta L_DAD_ss + gamma L_ADV
    D minimises  L_D

**One loss, one backward.** The trainer owns a single optimiser over ``trainable_modules()`` (student, generator,
discriminator) and calls ``backward`` once on the loss this task returns. The min-max is folded into that one
loss so that each module receives the gradient of its *own* objective:

- a gradient-reversal layer (identity forward, ``-grad`` backward, :func:`grad_reverse`) sits on ``x_g`` before
  ``T`` and on ``S``'s logits and attention maps before ``L_MAE`` / ``L_DAD_ss``. ``T``'s parameters see
  ``+grad(alpha L_MAE + beta L_DAD_ss)`` while every path back to ``G`` is reversed, so ``G`` sees ``-grad``: G
  maximises the discrepancy that T minimises. ``L_BNS`` and ``L_DAD_st`` reach ``G`` through ``S``'s BatchNorm
  inputs and attention *without* reversal, so G minimises them;
- ``D`` runs twice on the same patches: once through the trainer's (possibly DDP-wrapped) module on *detached*
  patches for ``L_D`` (only D learns), once functionally with *detached parameters* on live patches for
  ``L_ADV`` (only T learns). ``S`` is frozen (no parameter needs a gradient) and never trained.

The summed loss ``L_BNS + alpha L_MAE + beta L_DAD_ss + tau L_DAD_st + L_TAR + gamma L_ADV + L_D`` is therefore
not an objective anyone minimises; it is a carrier of the right gradients. The parts are logged separately.

Published (SFDA, Liu et al. 2021, via summaries): the loss terms and their weights above, ``z`` of dimension 256,
generated images 256x128 (W x H), ``K`` in {3, 4, 5}, SGD lr 2.5e-4 / momentum 0.9 / wd 1e-4, target 512x256,
batch 8. MaxSquare and its image-wise weighting (ratio 0.2): Chen et al. 2019. L_BNS: DeepInversion (Yin et al.
2020).

Reconstructed (the mechanism is published, the exact form is ours; all are ``method.*`` options):

- the generator: DCGAN-like (linear -> ``8w x H/16 x W/16``, four nearest-upsample + 3x3 conv + BN + LeakyReLU
  blocks, 3x3 conv to RGB, sigmoid: 0..1 RGB, which sfdaseg models normalise themselves); its BatchNorm layers
  always use batch statistics (``track_running_stats=False``), so sampling needs no running averages;
- how the target model's BatchNorm sees generated images (``student_gen_bn``): ``running`` (default) runs the
  real crops in train mode and the generated images in a second pass with BatchNorm in eval mode, i.e. through
  the running statistics, exactly as the frozen source sees them; the running statistics are then those of the
  real target images only (the AdaBN effect), and the discrepancy terms compare two networks that normalise
  alike. ``joint`` resizes the generated images to the crop size and runs ``[x_g; x]`` in one train-mode pass:
  generated and real images share batch statistics and the running statistics drift towards the generator's
  images;
- ``L_MAE`` on logits (as in data-free adversarial distillation), at the logit resolution;
- dual attention: features are average-pooled to at most ``attention_grid`` positions, then
  ``softmax(cos / T)`` over positions (spatial) and over channels (channel), temperature 0.1; ``L_DAD_ss`` is the
  per-row L1 between the maps, summed over the two kinds; ``L_DAD_st`` is the KL between the batch-mean maps
  (the generated and the real batch hold different images, so per-image pairs do not exist);
- the discriminator: three 3x3 convs (LeakyReLU 0.2, no normalisation) on the patch with a one-hot encoding of
  its position as ``K^2`` extra channels, global average pooling, a linear logit; input the softmax patch
  (``disc_input=prob``) or its self-information ``-p log p`` (``self_info``); its loss weight ``disc_weight``;
- the discriminator and generator learn at the head learning rate times ``disc_lr_mult`` / ``gen_lr_mult``
  (``optim.lr * optim.head_lr_mult * mult``): both start from scratch beside a fine-tuned target model, and at
  the model's small LR the generator barely moves towards the source statistics within a run; the trainer has
  one optimiser, so they share its kind (SGD or AdamW) and its schedule;
- ``export=teacher`` (the adapt default) delivers an EMA (momentum ``ema_momentum``) of the target model, ours,
  not used by any loss; ``export=student`` delivers the target model itself, as published.

Generated images: :meth:`SFDALiu.sample_images` returns a fixed-noise batch; every ``sample_every`` steps a PNG
grid goes to ``<run_dir>/generated/step_<N>.png`` (:func:`save_image_grid`).

What these choices are worth on the built-in benchmark is measured in ``benchmarks/results/sfda_liu_synthetic.md``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sfdaseg.config_base import ConfigError, choices, param
from sfdaseg.data.transforms import to_model_input
from sfdaseg.losses import resize_logits
from sfdaseg.methods.common import AdaptContext, RecipeConfig, valid_pixels
from sfdaseg.models.base import unwrap_model
from sfdaseg.models.ema import EMATeacher
from sfdaseg.pseudo_labels import pseudo_label_stats
from sfdaseg.regularizers import CollapseConfig, SourceRegularizer
from sfdaseg.task import StepOutput, TaskBase

__all__ = [
    "BNStatisticsLoss", "Generator", "PatchDiscriminator", "SFDALiu", "SFDALiuConfig", "attention_kl",
    "attention_l1", "build", "check_batchnorm", "dual_attention", "grad_reverse", "ipsm_losses", "maxsquare_loss",
    "patch_entropy", "rank_patches", "save_image_grid", "to_patches",
]


@dataclass
class SFDALiuConfig(CollapseConfig, RecipeConfig):
    # Knowledge transfer: generator and its objective.
    z_dim: int = param(256, ge=1, origin="published", help="noise dimension")
    gen_size: tuple[int, int] = param((128, 256), ge=16, origin="published",
                                      help="(H, W) of generated images, divisible by 16 (published 256x128, W x H)")
    gen_width: int = param(32, ge=1, origin="reconstructed", help="generator base width w (8w channels at H/16)")
    gen_batch_size: int | None = param(None, ge=1, origin="published",
                                       help="generated images per step; null: the target batch size (published 8)")
    bns_weight: float = param(1.0, ge=0.0, origin="published", help="weight of L_BNS in G's objective")
    mae_weight: float = param(1.0, ge=0.0, origin="published", help="alpha (L_MAE)")
    dad_weight: float = param(0.5, ge=0.0, origin="published", help="beta (L_DAD_ss)")
    dad_st_weight: float = param(0.5, ge=0.0, origin="published", help="tau = beta (L_DAD_st, G only)")
    attention_grid: tuple[int, int] = param((32, 64), ge=1, origin="reconstructed",
                                            help="at most (h, w) positions of the dual attention")
    attention_temperature: float = param(0.1, gt=0.0, origin="reconstructed", help="softmax(cos / T)")
    # Target model: MaxSquare + IPSM.
    tar_weight: float = param(1.0, ge=0.0, origin="published", help="L_TAR (MaxSquare)")
    maxsquare_image_weighted: bool = param(False, origin="published",
                                           help="Chen et al. 2019 image-wise class-balanced weights")
    maxsquare_ratio: float = param(0.2, ge=0.0, le=1.0, origin="published", help="image-wise weighting ratio")
    patch_grid: int = param(4, ge=2, origin="published", help="K in {3, 4, 5}: IPSM's K x K patches")
    adv_weight: float = param(0.01, ge=0.0, origin="published", help="gamma (L_ADV)")
    disc_weight: float = param(1.0, ge=0.0, origin="reconstructed", help="weight of L_D (only D sees it)")
    disc_width: int = param(64, ge=1, origin="reconstructed", help="discriminator width")
    disc_input: str = choices("prob", "self_info", default="prob", origin="reconstructed", help="what D sees of a patch")
    # Ours.
    ema_momentum: float = param(0.999, ge=0.0, lt=1.0,
                                help="export=teacher: an EMA of the target model is delivered (no loss uses it)")
    sample_every: int = param(200, ge=0, help="save a PNG grid of generated images every N steps; 0: never")
    sample_count: int = param(16, ge=1, help="images in the grid (fixed noise)")
    gen_lr_mult: float = param(1.0, gt=0.0, help="G's LR = optim.lr * head_lr_mult * gen_lr_mult")
    disc_lr_mult: float = param(1.0, gt=0.0, help="D's LR = optim.lr * head_lr_mult * disc_lr_mult")
    student_gen_bn: str = choices(
        "running", "joint", default="running",
        help="how the target model's BatchNorm treats generated images: 'joint' normalises them in one batch with "
             "the real target crops (one forward); 'running' runs them in a second forward with BatchNorm in eval "
             "mode (the running statistics, as the frozen source does), so that generated images never enter the "
             "target model's batch or running statistics")

    def validate(self) -> None:
        super().validate()
        h, w = self.gen_size
        if h % 16 or w % 16:
            raise ConfigError(f"method.gen_size: expected positive (H, W) divisible by 16 (four 2x upsamplings), "
                              f"got {list(self.gen_size)}")


# ------------------------------------------------------------------------------------------------ gradient reversal


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.neg()


def grad_reverse(x: torch.Tensor) -> torch.Tensor:
    """Identity in the forward pass; negates the gradient in the backward pass (Ganin & Lempitsky 2015)."""
    return _GradReverse.apply(x)


# ------------------------------------------------------------------------------------------------ BN statistics


def batchnorm_layers(module: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer of ``module`` that keeps running statistics."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]


@contextlib.contextmanager
def batchnorm_eval(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``model`` in eval mode (running statistics, no update) inside the block; restored after."""
    layers = [m for m in batchnorm_layers(unwrap_model(model)) if m.training]
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for m in layers:
            m.train()


def check_batchnorm(model: nn.Module) -> None:
    """Raise :class:`ConfigError` unless ``model``'s backbone has BatchNorm layers with running statistics.

    The backbone is what matters: L_BNS inverts the statistics of the image encoder. SegFormer's encoder uses
    LayerNorm (its one BatchNorm sits in the decoder head), so it is refused like a model with none.
    """
    model = unwrap_model(model)
    name = getattr(model, "name", type(model).__name__)
    backbone = getattr(model, "backbone", model)
    if not batchnorm_layers(backbone):
        raise ConfigError(
            f"recipe sfda_liu: model {name!r} has no BatchNorm layer in its backbone, and sfda_liu needs BatchNorm "
            "layers; segformer uses LayerNorm (its encoder has none) and tiny with norm=gn uses GroupNorm. L_BNS "
            "matches generated images to the source model's BatchNorm running statistics: adapt a model with "
            "BatchNorm (deeplabv2_r101, lraspp_mobilenet_v3_large, deeplabv3_mobilenet_v3_large, tiny with norm=bn)"
        )


class BNStatisticsLoss:
    """Forward pre-hooks on every BatchNorm layer of ``model`` that measure its input's batch statistics.

    Inside ``with loss.capture() as terms:``, each BatchNorm layer that runs appends
    ``||mu - running_mean||_2 + ||var - running_var||_2`` (a scalar, float32, with grad through its input) to
    ``terms``, where ``mu`` and ``var`` are the mean and biased variance of its input over every dimension but the
    channel one. Outside ``capture`` the hooks do nothing. L_BNS = ``torch.stack(terms).sum()``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = batchnorm_layers(model)
        if not self.layers:
            raise ValueError("BNStatisticsLoss: the model has no BatchNorm layer with running statistics")
        self._terms: list[torch.Tensor] | None = None
        self.handles = [m.register_forward_pre_hook(self._hook) for m in self.layers]

    def _hook(self, module: _BatchNorm, inputs: tuple[torch.Tensor, ...]) -> None:
        if self._terms is None:
            return
        x = inputs[0].float()  # statistics in float32 under autocast
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        self._terms.append(torch.linalg.vector_norm(mean - module.running_mean.float())
                           + torch.linalg.vector_norm(var - module.running_var.float()))

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        self._terms = terms = []
        try:
            yield terms
        finally:
            self._terms = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------------------------ generator


class Generator(nn.Module):
    """DCGAN-like generator: noise ``(B, z_dim)`` -> RGB images ``(B, 3, H, W)`` in ``[0, 1]``.

    ``linear -> (8w, H/16, W/16) -> BN -> 4 x [nearest 2x, conv3x3, BN, LeakyReLU(0.2)] (8w->4w->2w->w->w)
    -> conv3x3 -> sigmoid``. BatchNorm layers use batch statistics in train and eval mode alike.
    """

    def __init__(self, *, z_dim: int = 256, size: tuple[int, int] = (128, 256), width: int = 64) -> None:
        super().__init__()
        h, w = (int(s) for s in size)
        if h <= 0 or w <= 0 or h % 16 or w % 16:
            raise ValueError(f"Generator: size (H, W) must be positive and divisible by 16, got {tuple(size)}")
        self.z_dim, self.size = int(z_dim), (h, w)
        chans = [8 * width, 4 * width, 2 * width, width, width]
        self.base = (chans[0], h // 16, w // 16)
        self.fc = nn.Linear(self.z_dim, chans[0] * (h // 16) * (w // 16))
        layers: list[nn.Module] = [nn.BatchNorm2d(chans[0], track_running_stats=False)]
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                       nn.BatchNorm2d(cout, track_running_stats=False), nn.LeakyReLU(0.2, inplace=True)]
        self.blocks = nn.Sequential(*layers)
        self.to_rgb = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, z_dim)`` -> ``(B, 3, H, W)`` in ``[0, 1]``."""
        x = self.fc(z).view(z.shape[0], *self.base)  # (B, 8w, H/16, W/16)
        return torch.sigmoid(self.to_rgb(self.blocks(x)))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"head": list(self.parameters())}  # a new module: it learns at the head learning rate


# ------------------------------------------------------------------------------------------------ dual attention


def dual_attention(features: torch.Tensor, *, max_grid: tuple[int, int] = (32, 64),
                   temperature: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameter-free spatial and channel attention of features ``(B, D, h, w)``.

    The features are average-pooled to ``(min(h, gh), min(w, gw))`` with ``(gh, gw) = max_grid``, so the number of
    positions is bounded: ``N <= M = gh * gw`` whatever the input size, and the two maps take ``B * (N^2 + D^2)
    <= B * (M^2 + D^2)`` floats (float32: 8 * (2048^2 + 256^2) * 4 bytes = 136 MB at the default grid, B = 8,
    D = 256). Then, with ``f`` the pooled features ``(B, D, N)``:

    - spatial ``(B, N, N)``: row ``i`` is ``softmax_j(cos(f_:i, f_:j) / temperature)`` (cosine over channels);
    - channel ``(B, D, D)``: row ``c`` is ``softmax_d(cos(f_c:, f_d:) / temperature)`` (cosine over positions).

    Rows are probability distributions. Computed in float32 (autocast off).
    """
    if features.dim() != 4:
        raise ValueError(f"dual_attention: expected features (B, D, h, w), got {tuple(features.shape)}")
    h, w = features.shape[-2:]
    grid = (min(h, int(max_grid[0])), min(w, int(max_grid[1])))
    with torch.autocast(features.device.type, enabled=False):
        f = F.adaptive_avg_pool2d(features.float(), grid).flatten(2)  # (B, D, N)
        fs = F.normalize(f, dim=1)  # unit vector per position
        spatial = torch.softmax(fs.transpose(1, 2) @ fs / temperature, dim=-1)  # (B, N, N)
        fc = F.normalize(f, dim=2)  # unit vector per channel
        channel = torch.softmax(fc @ fc.transpose(1, 2) / temperature, dim=-1)  # (B, D, D)
    return spatial, channel


def attention_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over rows (and batch) of the L1 distance between row distributions ``(..., R, R')``; in ``[0, 2]``."""
    return (a - b).abs().sum(-1).mean()


def attention_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over rows of ``KL(p_row || q_row)`` for row distributions ``(..., R, R')``."""
    return (p * (p.clamp_min(eps).log() - q.clamp_min(eps).log())).sum(-1).mean()


# ------------------------------------------------------------------------------------------------ target losses


def maxsquare_loss(probs: torch.Tensor, *, image_weighted: bool = False, ratio: float = 0.2,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """MaxSquare loss (Chen et al. 2019) of probabilities ``(B, C, H, W)``.

    Plain: ``-0.5 * mean(p^2)`` over every element (over the ``valid`` ``(B, H, W)`` pixels only when given: crop
    padding is not target content). Image-wise class-balanced (their ``IW_MaxSquareloss``): with ``n_bc`` the
    number of pixels of image ``b`` predicted as class ``c`` (argmax) and ``N`` its pixel count, each pixel of
    predicted class ``c`` weighs ``w = 1 / max(n_bc^ratio * N^(1-ratio), 1)`` (detached) and the loss is
    ``-sum(w * p^2) / (B * C)``, so that large classes do not dominate the gradient.
    """
    p = probs.float()
    if valid is not None:
        p = p * valid[:, None].to(p.dtype)  # padding contributes 0 (and nothing to the image-wise counts)
    if not image_weighted:
        if valid is None:
            return -0.5 * p.pow(2).mean()
        return -0.5 * p.pow(2).sum() / (valid.float().sum() * p.shape[1]).clamp_min(1.0)
    b, c = p.shape[:2]
    with torch.no_grad():
        label = p.argmax(1).flatten(1)  # (B, HW)
        hist = torch.zeros(b, c, device=p.device).scatter_add_(1, label, torch.ones_like(label, dtype=torch.float))
        n = hist.sum(1, keepdim=True)
        w_class = 1.0 / torch.clamp_min(hist.pow(ratio) * n.pow(1.0 - ratio), 1.0)  # (B, C)
        w = w_class.gather(1, label).view(b, 1, *p.shape[2:])  # (B, 1, H, W)
    return -(p.pow(2) * w).sum() / (b * c)


def to_patches(x: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, C, H, W)`` with ``H, W`` divisible by ``k`` -> ``(B, k*k, C, H/k, W/k)``, patches in row-major order."""
    b, c, h, w = x.shape
    if h % k or w % k:
        raise ValueError(f"to_patches: size {(h, w)} is not divisible by K={k}")
    x = x.reshape(b, c, k, h // k, k, w // k).permute(0, 2, 4, 1, 3, 5)  # (B, k, k, C, h/k, w/k)
    return x.reshape(b, k * k, c, h // k, w // k)


def patch_entropy(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches of probabilities ``(B, C, h, w)`` and their mean normalised entropy.

    The map is first resized (bilinear: rows stay distributions) to the next multiple of ``k`` in each dimension.
    Returns ``patches (B, k*k, C, ph, pw)`` and ``entropy (B, k*k)`` in ``[0, 1]`` (per-pixel entropy / log C,
    averaged over the patch).
    """
    h, w = probs.shape[-2:]
    size = (k * math.ceil(h / k), k * math.ceil(w / k))
    if size != (h, w):
        probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
    patches = to_patches(probs, k)
    c = probs.shape[1]
    ent = -(patches * patches.clamp_min(1e-8).log()).sum(2) / math.log(max(c, 2))  # (B, k*k, ph, pw)
    return patches, ent.mean((-2, -1))


def rank_patches(entropy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Easy / hard masks ``(B, P)`` from patch entropies ``(B, P)``, ranked within the batch at each position.

    At every position the ``B // 2`` lowest-entropy patches of the batch are easy and the ``B // 2`` highest are
    hard (the middle one of an odd batch is neither; a batch of one has none). No host sync.
    """
    b = entropy.shape[0]
    rank = entropy.argsort(0).argsort(0)  # (B, P): 0 = lowest entropy at that position
    half = b // 2
    return rank < half, rank >= b - half


class PatchDiscriminator(nn.Module):
    """Position-conditioned patch discriminator: patches ``(N, C, ph, pw)`` + positions ``(N,)`` -> logits ``(N,)``.

    The position (``0 .. positions-1``, row-major in the ``KxK`` grid) enters as a one-hot map of ``positions``
    extra channels. Three 3x3 convs (the second with stride 2), LeakyReLU(0.2), no normalisation (so a functional
    call with detached parameters is exactly the module), global average pooling, a linear logit: "easy".
    """

    def __init__(self, in_channels: int, positions: int, *, width: int = 64) -> None:
        super().__init__()
        self.positions = int(positions)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels + self.positions, width, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 1),
        )

    def forward(self, patches: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        pos = F.one_hot(position, self.positions).to(patches.dtype)  # (N, P)
        pos = pos[:, :, None, None].expand(-1, -1, *patches.shape[-2:])
        return self.body(torch.cat([patches, pos], dim=1))[:, 0]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"head": list(self.parameters())}  # a new module: it learns at the head learning rate


def ipsm_losses(probs: torch.Tensor, disc: nn.Module, disc_raw: nn.Module, *, k: int,
                disc_input: str = "prob") -> dict[str, torch.Tensor]:
    """IPSM on target probabilities ``(B, C, h, w)`` (with grad to the target model).

    Returns ``disc`` (L_D: BCE of ``disc`` on detached patches, easy=1 / hard=0; grads reach ``disc`` only),
    ``adv`` (L_ADV: BCE(hard -> easy) of ``disc_raw`` called with detached parameters; grads reach the target
    model only), ``disc_acc`` (D's accuracy on the ranked patches), ``hard_entropy`` and ``easy_entropy``.
    ``disc`` is the module to train (possibly DDP-wrapped), ``disc_raw`` the plain module behind it.
    """
    patches, ent = patch_entropy(probs.float(), k)  # (B, P, C, ph, pw), (B, P)
    easy, hard = rank_patches(ent.detach())
    if disc_input == "self_info":
        patches = -patches * patches.clamp_min(1e-8).log() / math.log(max(patches.shape[2], 2))
    b, p = ent.shape
    x = patches.flatten(0, 1)  # (B*P, C, ph, pw)
    position = torch.arange(p, device=x.device).repeat(b)  # (B*P,)
    easy_f, hard_f = easy.flatten().float(), hard.flatten().float()
    ranked = easy_f + hard_f
    logit = disc(x.detach(), position)
    bce_easy = F.binary_cross_entropy_with_logits(logit.float(), torch.ones_like(easy_f), reduction="none")
    bce_hard = F.binary_cross_entropy_with_logits(logit.float(), torch.zeros_like(easy_f), reduction="none")
    loss_disc = (easy_f * bce_easy + hard_f * bce_hard).sum() / ranked.sum().clamp_min(1.0)
    frozen = {name: t.detach() for name, t in disc_raw.named_parameters()}
    logit_adv = torch.func.functional_call(disc_raw, frozen, (x, position))
    bce_adv = F.binary_cross_entropy_with_logits(logit_adv.float(), torch.ones_like(hard_f), reduction="none")
    loss_adv = (hard_f * bce_adv).sum() / hard_f.sum().clamp_min(1.0)
    with torch.no_grad():
        correct = torch.where(logit > 0, easy_f, hard_f)
        acc = (correct * ranked).sum() / ranked.sum().clamp_min(1.0)
        e = ent.detach()
        hard_ent = (e * hard).sum() / hard.sum().clamp_min(1)
        easy_ent = (e * easy).sum() / easy.sum().clamp_min(1)
    return {"disc": loss_disc, "adv": loss_adv, "disc_acc": acc, "hard_entropy": hard_ent,
            "easy_entropy": easy_ent}


# ------------------------------------------------------------------------------------------------ images


def save_image_grid(images: torch.Tensor, path: str | Path, *, nrow: int = 4) -> Path:
    """Write images ``(N, 3, H, W)`` in ``[0, 1]`` as one PNG grid (``nrow`` images per row, 2 px padding)."""
    from torchvision.utils import save_image

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"save_image_grid: expected images (N, 3, H, W), got {tuple(images.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.detach().float().clamp(0, 1).cpu(), path, nrow=nrow, padding=2)
    return path


# ------------------------------------------------------------------------------------------------ the task


class SFDALiu(TaskBase):
    """The trainer task of ``sfda_liu`` (see the module docstring).

    Trainable modules: ``student`` (the target model), ``generator``, ``discriminator``. Non-trainable: the frozen
    source model (with BatchNorm hooks) and, for ``export=teacher``, an EMA of the student.
    """

    def __init__(self, ctx: AdaptContext, cfg: SFDALiuConfig) -> None:
        model = ctx.model
        check_batchnorm(model)
        self.cfg = cfg
        self.student = model
        self.num_classes = ctx.classes.num_classes
        self.ignore = ctx.classes.ignore_index
        # The frozen source: a copy taken before any step, in eval mode (its BN layers normalise with the running
        # statistics L_BNS matches); it lets gradients through to its input but has none of its own.
        self.source = copy.deepcopy(unwrap_model(model)).requires_grad_(False).eval()
        self.bns = BNStatisticsLoss(self.source)
        self.generator = Generator(z_dim=cfg.z_dim, size=cfg.gen_size, width=cfg.gen_width).to(ctx.device)
        self.disc = PatchDiscriminator(self.num_classes, cfg.patch_grid ** 2, width=cfg.disc_width).to(ctx.device)
        # Read by the trainer's build_param_groups: both start from scratch beside a fine-tuned model.
        self.generator.lr_mult = cfg.gen_lr_mult
        self.disc.lr_mult = cfg.disc_lr_mult
        self.generator.from_scratch = self.disc.from_scratch = True  # optim.decay_to=init leaves them alone
        self.teacher = EMATeacher(model, momentum=cfg.ema_momentum) if ctx.export == "teacher" else None
        if ctx.batch_size is not None and ctx.batch_size < 2 and (cfg.adv_weight > 0 or cfg.disc_weight > 0):
            raise ConfigError("recipe sfda_liu: IPSM ranks the patches of a batch into easy and hard halves, which "
                              "needs data.batch_size >= 2 per process (or method.adv_weight=0 method.disc_weight=0)")
        # Collapse prevention: the class prior and the anchor on the target predictions; the anchor reuses the
        # frozen source model this recipe keeps anyway.
        self.reg = SourceRegularizer(cfg, source=model, target=ctx.target, num_classes=self.num_classes,
                                     device=ctx.device, frozen=self.source)
        self.run_dir = Path(ctx.run_dir) if ctx.run_dir is not None and ctx.is_main else None  # rank 0 writes
        # Fixed noise for the image grids (its own RNG: the training stream is not disturbed).
        rng = torch.Generator().manual_seed(0)
        self.fixed_z = torch.randn(cfg.sample_count, cfg.z_dim, generator=rng).to(ctx.device)
        self.net: nn.Module = model
        self.gen: nn.Module = self.generator
        self.dis: nn.Module = self.disc

    # -------------------------------------------------------------- trainer protocol

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"student": self.student, "generator": self.generator, "discriminator": self.disc}

    def wrap_trainable(self, wrap) -> None:
        self.net = wrap("student", self.student)
        self.gen = wrap("generator", self.generator)
        self.dis = wrap("discriminator", self.disc)

    def training_step(self, batch: dict, step: int) -> StepOutput:
        cfg = self.cfg
        x = to_model_input(batch["image"])  # (B, 3, H, W) real target crops
        b, size = x.shape[0], tuple(x.shape[-2:])
        bg = cfg.gen_batch_size or b
        z = torch.randn(bg, cfg.z_dim, device=x.device)
        x_g = self.gen(z).float()  # (Bg, 3, Hg, Wg) in [0, 1]
        if tuple(x_g.shape[-2:]) != size:
            # student_gen_bn=joint runs generated and real images in one forward, so they need one size; the
            # two-pass mode uses the same size, so that both modes show the target model the same images.
            x_g = F.interpolate(x_g, size=size, mode="bilinear", align_corners=False)

        # Frozen source on x_g: BN statistics (G minimises), logits and features (no reversal here).
        with self.bns.capture() as terms:
            s_logits, s_feat = self.source(x_g, return_features=True)  # (Bg, C, h, w), (Bg, D, h, w)
        loss_bns = torch.stack(terms).sum()

        # Target model on reversed x_g and on x: its parameters minimise the discrepancy, G (behind the reversal)
        # maximises it.
        if cfg.student_gen_bn == "joint":
            logits, feat = self.net(torch.cat([grad_reverse(x_g), x.to(x_g.dtype)]), return_features=True)
            t_logits_g, t_logits = logits[:bg], logits[bg:]
            t_feat_g, t_feat = feat[:bg], feat[bg:]
        else:
            # Real crops first, in train mode (the only pass that updates running statistics). The second pass
            # calls the same parameters again before the one backward: autograd sums both contributions before
            # each parameter's gradient hook fires, so DDP reduces once.
            t_logits, t_feat = self.net(x, return_features=True)
            with batchnorm_eval(self.student):
                t_logits_g, t_feat_g = self.net(grad_reverse(x_g), return_features=True)

        loss_mae = (t_logits_g.float() - grad_reverse(s_logits.float())).abs().mean()
        grid, temp = tuple(cfg.attention_grid), cfg.attention_temperature
        att_s = dual_attention(s_feat, max_grid=grid, temperature=temp)
        att_t = dual_attention(t_feat_g, max_grid=grid, temperature=temp)
        loss_dad_ss = sum(attention_l1(t, grad_reverse(s)) for t, s in zip(att_t, att_s))
        if cfg.dad_st_weight > 0:
            with torch.no_grad():
                att_r = dual_attention(t_feat, max_grid=grid, temperature=temp)
            loss_dad_st = sum(attention_kl(r.mean(0), s.mean(0)) for r, s in zip(att_r, att_s))
        else:
            loss_dad_st = torch.zeros((), device=x.device)

        # Target self-supervision on the real batch (crop padding left out).
        valid = valid_pixels(batch)
        loss_tar = maxsquare_loss(torch.softmax(resize_logits(t_logits, size).float(), dim=1),
                                  image_weighted=cfg.maxsquare_image_weighted, ratio=cfg.maxsquare_ratio, valid=valid)
        probs = torch.softmax(t_logits.float(), dim=1)  # (B, C, h, w)
        ipsm = ipsm_losses(probs, self.dis, self.disc, k=cfg.patch_grid, disc_input=cfg.disc_input)

        loss = (cfg.bns_weight * loss_bns + cfg.mae_weight * loss_mae + cfg.dad_weight * loss_dad_ss
                + cfg.dad_st_weight * loss_dad_st + cfg.tar_weight * loss_tar + cfg.adv_weight * ipsm["adv"]
                + cfg.disc_weight * ipsm["disc"])
        reg_logs = {}
        if self.reg.active:
            loss_reg, reg_logs = self.reg.loss(t_logits, self.reg.source_probs(x), valid=valid)
            loss = loss + loss_reg
        with torch.no_grad():
            conf, label = probs.max(1)
            stats = pseudo_label_stats(label, conf, num_classes=self.num_classes, ignore_index=self.ignore)
        logs = {"loss_bns": loss_bns.detach(), "loss_mae": loss_mae.detach(), "loss_dad_ss": loss_dad_ss.detach(),
                "loss_dad_st": loss_dad_st.detach(), "loss_tar": loss_tar.detach(), "loss_adv": ipsm["adv"].detach(),
                "loss_disc": ipsm["disc"].detach(), "disc_acc": ipsm["disc_acc"],
                "ipsm/hard_entropy": ipsm["hard_entropy"], "ipsm/easy_entropy": ipsm["easy_entropy"],
                "gen/mean": x_g.detach().mean(), "gen/std": x_g.detach().std(), **reg_logs,
                **{f"pl/{k}": v for k, v in stats.items()}}  # statistics of the target model's own predictions
        return StepOutput(loss, logs)

    def after_optimizer_step(self, step: int) -> None:
        if self.teacher is not None:
            self.teacher.update(self.student, step)
        every = self.cfg.sample_every
        if every and (step + 1) % every == 0 and self.run_dir is not None:
            self.save_samples(self.run_dir / "generated" / f"step_{step + 1:06d}.png")

    def frozen_modules(self) -> dict[str, nn.Module]:
        # The source's BatchNorm hooks read their inputs' statistics: they work in a compiled graph too.
        return {"source": self.source, **({"teacher": self.teacher} if self.teacher is not None else {})}

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict()} if self.teacher is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])

    def export_model(self) -> nn.Module:
        return self.teacher.module if self.teacher is not None else self.student

    # -------------------------------------------------------------- generated images

    @torch.no_grad()
    def sample_images(self, n: int | None = None) -> torch.Tensor:
        """``n`` (default ``sample_count``) images ``(n, 3, H, W)`` in ``[0, 1]`` from the fixed noise, on the CPU."""
        n = self.cfg.sample_count if n is None else min(int(n), self.fixed_z.shape[0])
        # Host copy: called every sample_every steps only.
        return self.generator(self.fixed_z[:n]).float().cpu()

    def save_samples(self, path: str | Path) -> Path:
        """Write :meth:`sample_images` as a PNG grid to ``path``."""
        return save_image_grid(self.sample_images(), path, nrow=4)


def build(ctx: AdaptContext, cfg: SFDALiuConfig) -> SFDALiu:
    return SFDALiu(ctx, cfg)
