"""Training objectives. Each task returns a loss from ``training_step`` and never steps an optimizer.

``RECIPES`` is the registry of adaptation recipes (a plain dict): name -> :class:`Recipe`, whose ``config_cls``
is the typed dataclass of the recipe's hyper-parameters (the ``method.*`` keys of an adapt config) and whose
``build(ctx, cfg)`` returns the task the trainer runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sfdaseg.methods import diga_sf, selftrain, sfda_liu, stvm


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    config_cls: type
    build: Callable[..., Any]


RECIPES: dict[str, Recipe] = {
    "selftrain": Recipe("selftrain", "mean teacher + confidence-based pseudo-label selection + ClassMix (DAFormer-style)",
                        selftrain.SelfTrainConfig, selftrain.build),
    "stvm": Recipe("stvm", "STvM: metric-learning reliability on every pixel + metric-guided ClassMix",
                   stvm.STvMConfig, stvm.build),
    "diga_sf": Recipe("diga_sf", "DiGA, source-free: bilateral consensus + cross-view distillation + target ClassMix",
                      diga_sf.DiGAConfig, diga_sf.build),
    "sfda_liu": Recipe("sfda_liu", "SFDA (Liu et al. 2021): generator inverting BN statistics + adversarial "
                       "distillation + MaxSquare + patch-level self-supervision (IPSM)",
                       sfda_liu.SFDALiuConfig, sfda_liu.build),
}
