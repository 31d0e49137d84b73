"""MC-dropout uncertainty: ``T`` stochastic passes of the classifier's dropout on features computed once.

UniSFDA rates a pseudo-label by how much the prediction moves when the ``Dropout2d`` before the final 1x1
classifier is kept active. Only that last step is random, so the backbone and head run **once**
(``model.extract``) and only the classifier is sampled ``T`` times::

    features = model.extract(x)                                 # (B, D, h, w), once
    logits_t = conv1x1(dropout2d_t(features)),  t = 1..T        # (B, C, h, w) each
    p_t = softmax(logits_t)  ->  mean_prob, entropy, variance, mutual_information

**How the T passes are vectorised.** ``Dropout2d`` zeroes whole channels of each sample (a keep mask
``m_t`` of shape ``(B, D)``) and scales the rest by ``1 / (1 - p)``; a 1x1 convolution is a matrix product
over channels. So ``W (f * m_t / (1 - p)) = (W * m_t / (1 - p)) f``: each pass is the classifier with a masked
weight, and all passes of a chunk are one batched matmul ``(B, Tc*C, D) @ (B, D, h*w)``. No copy of the
``D``-channel features is made (``C`` is usually 19 while ``D`` is 256-768), and dropout is sampled without
touching any module's train/eval state. The masks are drawn from ``generator`` (all ``T`` at once, so the
result does not depend on the chunking).

Models whose classifier is not the standard ``Dropout2d(p) + Conv2d(D, C, 1)`` (or whose ``classify`` is
overridden) take a generic path: the classifier's dropout modules are switched to train mode for the passes
(and restored afterwards; nothing else changes mode), the features are repeated along the batch dimension in
chunks and ``model.classify`` runs once per chunk.

**Memory bound.** Passes are processed in chunks of ``Tc`` so that one chunk holds at most ``chunk_elements``
values of ``B * Tc * C * H * W`` (``H, W`` = ``out_size`` or the feature size; generic path: also
``B * Tc * D * h * w``); peak extra memory is about four float32 buffers of that size (logits, upsampled
logits, probabilities, a temporary) plus the accumulators, ``2 * B*C*H*W + B*H*W`` float32. The default
``2**25`` elements keeps one chunk buffer at 128 MiB.

Everything runs without gradients and without host synchronisation (the generic path with a ``generator``
on a GPU syncs once to seed the global RNG, see :func:`_seeded_global_rng`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sfdaseg.models.base import SegmentationModel, unwrap_model

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "McDropoutResult",
    "head_logit_samples",
    "max_entropy",
    "mc_dropout",
    "mc_dropout_features",
]

# Values of one chunk buffer (B * Tc * C * H * W); 2**25 float32 = 128 MiB.
DEFAULT_CHUNK_ELEMENTS = 2**25
STRATEGIES = ("auto", "weights", "module")


@dataclass(frozen=True)
class McDropoutResult:
    """Statistics of ``T`` MC-dropout passes, all float32 and detached.

    Attributes:
        mean_prob: ``(B, C, H, W)`` mean of the ``T`` softmax probabilities.
        entropy: ``(B, H, W)`` predictive entropy of the mean, ``-sum_c m_c log m_c`` in nats, in ``[0, log C]``.
        variance: ``(B, H, W)`` mean over the ``C`` classes of the per-class variance of ``p_t`` across passes
            (population variance, divided by ``T``), in ``[0, 0.25]``; 0 when ``T == 1``.
        label_variance: ``(B, H, W)`` the variance across passes of the probability of the predicted class
            (the argmax of ``mean_prob``).
        mutual_information: ``(B, H, W)`` ``entropy - mean_t H(p_t)`` (BALD: the part of the uncertainty that
            is due to the model, not to the data), in ``[0, entropy]``; 0 when ``T == 1``.
        passes: ``T``.
    """

    mean_prob: Tensor
    entropy: Tensor
    variance: Tensor
    label_variance: Tensor
    mutual_information: Tensor
    passes: int

    @property
    def confidence(self) -> Tensor:
        """``(B, H, W)`` the largest mean probability."""
        return self.mean_prob.amax(1)

    @property
    def label(self) -> Tensor:
        """``(B, H, W)`` long, the argmax of the mean probability."""
        return self.mean_prob.argmax(1)


# --------------------------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------------------------


def _model_name(model: nn.Module) -> str:
    return str(getattr(model, "name", type(model).__name__))


def _check_model(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """The unwrapped model and its classifier's dropout modules; errors say what MC-dropout expects."""
    m = unwrap_model(model)
    name = _model_name(m)
    classifier = getattr(m, "classifier", None)
    if not (isinstance(classifier, nn.Module) and callable(getattr(m, "extract", None))
            and callable(getattr(m, "classify", None))):
        raise TypeError(
            f"mc_dropout: model {name!r} ({type(m).__name__}) is not a segmentation model: expected extract(x) "
            "-> features, classify(features) -> logits and a `classifier` module (Dropout2d(p) + Conv2d(D, C, 1))"
        )
    drops = [d for d in classifier.modules() if isinstance(d, nn.modules.dropout._DropoutNd)]
    if not drops or max(float(d.p) for d in drops) <= 0.0:
        found = ", ".join(repr(d) for d in drops) or "no dropout module"
        raise ValueError(
            f"mc_dropout: model {name!r} has no dropout to sample in its classifier ({found}); MC-dropout "
            f"expects the classifier Dropout2d(p) + Conv2d(D, C, 1) with p > 0: build the model with a dropout "
            f"probability, e.g. build_model({name!r}, num_classes=..., dropout=0.1)"
        )
    return m, drops


def _standard_head(m: nn.Module) -> tuple[float, nn.Conv2d] | None:
    """``(p, conv)`` when ``classify`` is ``Dropout2d(p)`` then a plain 1x1 convolution, else None."""
    if getattr(type(m), "classify", None) is not SegmentationModel.classify:
        return None  # an overridden classify may do more than the classifier
    c = m.classifier
    if not (isinstance(c, nn.Sequential) and len(c) == 2 and type(c[0]) is nn.Dropout2d
            and type(c[1]) is nn.Conv2d):
        return None
    conv = c[1]
    if (conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1
            or conv.padding not in ((0, 0), "valid") or conv.padding_mode != "zeros"):
        return None
    return float(c[0].p), conv


def _check_args(features: Tensor, passes: int, out_size: tuple[int, int] | None) -> tuple[int, int] | None:
    if features.dim() != 4:
        raise ValueError(f"mc_dropout: expected features of shape (B, D, h, w), got {tuple(features.shape)}")
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"mc_dropout: passes must be a positive integer, got {passes!r}")
    if out_size is None:
        return None
    size = tuple(int(v) for v in out_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"mc_dropout: out_size must be (H, W) with positive sizes, got {out_size!r}")
    return size  # type: ignore[return-value]


def _chunk_passes(passes: int, per_pass: int, chunk_elements: int | None) -> int:
    budget = DEFAULT_CHUNK_ELEMENTS if chunk_elements is None else int(chunk_elements)
    if budget < 1:
        raise ValueError(f"mc_dropout: chunk_elements must be positive, got {chunk_elements}")
    return max(1, min(passes, budget // max(1, per_pass)))


def _keep_masks(b: int, passes: int, d: int, p: float, *, device: torch.device,
                generator: torch.Generator | None) -> Tensor:
    """``(B, T, D)`` float: 0 for a dropped channel, ``1 / (1 - p)`` for a kept one (Dropout2d's scaling)."""
    u = torch.rand(b, passes, d, generator=generator, device=device)
    return (u >= p).float() * (1.0 / (1.0 - p))


def _masked_head(conv: nn.Conv2d, features: Tensor, keep: Tensor) -> Tensor:
    """``Tc`` classifier passes at once: features ``(B, D, h, w)``, keep ``(B, Tc, D)`` -> ``(B*Tc, C, h, w)``."""
    b, d, h, w = features.shape
    tc = keep.shape[1]
    weight = conv.weight.reshape(conv.out_channels, d)  # (C, D)
    c = weight.shape[0]
    masked = (keep[:, :, None, :] * weight.float()).reshape(b, tc * c, d)  # (B, Tc*C, D)
    # bmm autocasts both operands under AMP; without autocast the weight follows the features' dtype.
    logits = torch.bmm(masked.to(features.dtype), features.reshape(b, d, h * w))  # (B, Tc*C, h*w)
    if conv.bias is not None:
        logits = logits + conv.bias.to(logits.dtype).repeat(tc)[None, :, None]
    return logits.reshape(b * tc, c, h, w)


def head_logit_samples(
    model: nn.Module, features: Tensor, *, passes: int, generator: torch.Generator | None = None
) -> Tensor:
    """All ``T`` stochastic classifier outputs at the feature resolution (no chunking: mind the memory).

    Dropout is applied as ``Dropout2d`` in train mode would (whole channels zeroed with probability ``p``,
    the others scaled by ``1 / (1 - p)``), whatever the model's mode. Standard classifiers only.

    Args:
        model: a :class:`SegmentationModel` (or a wrapper) with the standard classifier.
        features: ``(B, D, h, w)`` from ``model.extract``.
        passes: ``T``.
        generator: RNG on the features' device, or None for the global one.
    Returns:
        ``(B, T, C, h, w)`` logits.
    """
    m, _ = _check_model(model)
    _check_args(features, passes, None)
    head = _standard_head(m)
    if head is None:
        raise TypeError(
            f"head_logit_samples: model {_model_name(m)!r} does not have the standard classifier "
            f"Dropout2d(p) + Conv2d(D, C, 1) (found {m.classifier}); use mc_dropout_features(strategy='module')"
        )
    p, conv = head
    b, d, h, w = features.shape
    with torch.no_grad():
        keep = _keep_masks(b, passes, d, p, device=features.device, generator=generator)
        return _masked_head(conv, features, keep).reshape(b, passes, -1, h, w)


# --------------------------------------------------------------------------------------------------------------
# The generic path: the classifier's own dropout modules, switched on
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _dropout_active(drops: list[nn.Module]) -> Iterator[None]:
    """Dropout modules in train mode inside the block; each one's previous mode restored afterwards."""
    before = [d.training for d in drops]
    try:
        for d in drops:
            d.train(True)
        yield
    finally:
        for d, mode in zip(drops, before):
            d.train(mode)


@contextlib.contextmanager
def _seeded_global_rng(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """nn.Dropout draws from the global RNG and takes no generator: fork the device's global RNG and seed it
    from ``generator``, so the generic path is reproducible too. Reading the seed is a host sync when the
    generator lives on a GPU; only non-standard classifiers pay it."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if device.type == "cuda" else "cuda"):
        if device.type == "cuda":
            torch.cuda.default_generators[device.index if device.index is not None
                                          else torch.cuda.current_device()].manual_seed(seed)
        else:
            torch.random.default_generator.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------------------
# MC-dropout
# --------------------------------------------------------------------------------------------------------------


def mc_dropout_features(
    model: nn.Module,
    features: Tensor,
    *,
    passes: int,
    generator: torch.Generator | None = None,
    out_size: tuple[int, int] | None = None,
    chunk_elements: int | None = None,
    strategy: str = "auto",
) -> McDropoutResult:
    """MC-dropout statistics from features already computed by ``model.extract``.

    Args:
        model: a :class:`SegmentationModel` (DDP / compile wrappers are unwrapped) whose classifier has
            dropout with ``p > 0``.
        features: ``(B, D, h, w)``.
        passes: ``T >= 1``.
        generator: RNG on the features' device, or None for the global one.
        out_size: ``(H, W)``: each pass's logits are upsampled bilinearly to this size before the softmax (as
            full-size inference does); None keeps the feature size ``(h, w)``.
        chunk_elements: memory bound of one chunk of passes (see the module docstring); default
            :data:`DEFAULT_CHUNK_ELEMENTS`.
        strategy: ``"auto"`` (masked weights for the standard classifier, else the generic path),
            ``"weights"`` or ``"module"`` (the generic path: the classifier's dropout modules in train mode).
    Returns:
        :class:`McDropoutResult` with ``(H, W)`` = ``out_size`` or ``(h, w)``.
    """
    m, drops = _check_model(model)
    size = _check_args(features, passes, out_size)
    if strategy not in STRATEGIES:
        raise ValueError(f"mc_dropout: strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    head = _standard_head(m) if strategy != "module" else None
    if strategy == "weights" and head is None:
        raise TypeError(
            f"mc_dropout: strategy 'weights' needs the standard classifier Dropout2d(p) + Conv2d(D, C, 1) and "
            f"the base classify(); model {_model_name(m)!r} has {m.classifier}"
        )
    b, d, h, w = features.shape
    out_h, out_w = size if size is not None else (h, w)
    # C for the memory bound; the generic path takes the real C from the classifier's output.
    num_classes = head[1].out_channels if head is not None else int(getattr(m, "num_classes", 1))
    per_pass = b * num_classes * out_h * out_w
    if head is None:
        per_pass = max(per_pass, b * d * h * w)  # the repeated features
    tc = _chunk_passes(passes, per_pass, chunk_elements)
    device = features.device
    sums: list[Tensor] = []  # sum_t p_t (B, C, H, W), sum_t p_t^2 (B, C, H, W), sum_t H(p_t) (B, H, W)

    def accumulate(logits: Tensor, n: int) -> None:
        """``logits`` ``(B*n, C, h', w')`` of ``n`` passes of every image, pass-major within an image."""
        if logits.shape[-2:] != (out_h, out_w):
            logits = F.interpolate(logits, size=(out_h, out_w), mode="bilinear", align_corners=False)
        prob = logits.float().softmax(1).reshape(b, n, logits.shape[1], out_h, out_w)
        # xlogy: 0 * log 0 = 0, and the same formula as the entropy of the mean (T = 1 gives MI = 0).
        parts = (prob.sum(1), prob.square().sum(1), -torch.special.xlogy(prob, prob).sum(2).sum(1))
        if not sums:
            sums.extend(parts)
        else:
            for acc, part in zip(sums, parts):
                acc += part

    with torch.no_grad():
        if head is not None:
            p, conv = head
            keep = _keep_masks(b, passes, d, p, device=device, generator=generator)  # all T: chunk-independent
            for start in range(0, passes, tc):
                k = keep[:, start:start + tc]
                accumulate(_masked_head(conv, features, k), k.shape[1])
        else:
            with _dropout_active(drops), _seeded_global_rng(generator, device):
                for start in range(0, passes, tc):
                    n = min(tc, passes - start)
                    rep = features[:, None].expand(b, n, d, h, w).reshape(b * n, d, h, w)
                    accumulate(m.classify(rep), n)

        sum_p, sum_p2, sum_h = sums
        mean = sum_p / passes
        class_var = (sum_p2 / passes - mean.square()).clamp_min_(0.0)  # E[p^2] - E[p]^2, rounding kept >= 0
        entropy = -torch.special.xlogy(mean, mean).sum(1)
        mutual_information = (entropy - sum_h / passes).clamp_min_(0.0)
        label = mean.argmax(1, keepdim=True)
        return McDropoutResult(
            mean_prob=mean,
            entropy=entropy,
            variance=class_var.mean(1),
            label_variance=class_var.gather(1, label).squeeze(1),
            mutual_information=mutual_information,
            passes=passes,
        )


def mc_dropout(
    model: nn.Module,
    images: Tensor,
    *,
    passes: int,
    generator: torch.Generator | None = None,
    out_size: tuple[int, int] | None = None,
    chunk_elements: int | None = None,
    strategy: str = "auto",
) -> McDropoutResult:
    """MC-dropout uncertainty of ``model`` on ``images``: one ``extract``, ``T`` sampled classifier passes.

    The model's modes are used as they are for ``extract`` (call it on an ``eval()`` model so that BatchNorm
    uses its running statistics and stochastic depth is off); the classifier's dropout is sampled for the
    ``T`` passes whatever its mode, and no module's mode is changed when the call returns.

    Args:
        model: a :class:`SegmentationModel` (or a DDP / compile wrapper of one) with classifier dropout p > 0.
        images: ``(B, 3, H, W)`` float RGB in ``[0, 1]``.
        passes: ``T >= 1``.
        generator: RNG on the images' device, or None for the global one.
        out_size: ``(H, W)`` to upsample each pass's logits to (e.g. ``images.shape[-2:]``); None keeps the
            model's output size ``(H/s, W/s)``.
        chunk_elements, strategy: see :func:`mc_dropout_features`.
    Returns:
        :class:`McDropoutResult`.
    """
    m, _ = _check_model(model)
    with torch.no_grad():
        features = m.extract(images)
    return mc_dropout_features(m, features, passes=passes, generator=generator, out_size=out_size,
                               chunk_elements=chunk_elements, strategy=strategy)


def max_entropy(num_classes: int) -> float:
    """``log C``: the largest predictive entropy (for normalising :attr:`McDropoutResult.entropy` to [0, 1])."""
    return math.log(num_classes)
