"""Training objectives. Each task returns a loss from ``training_step`` and never steps an optimizer.

``RECIPES`` is the registry of adaptation recipes (a plain dict): name -> :class:`Recipe`, whose ``config_cls``
is the typed dataclass of the recipe's hyper-parameters (the ``method.*`` keys of an adapt config) and whose
``build(ctx, cfg)`` returns the task the trainer runs (a :class:`sfdaseg.task.Task`). :func:`get_recipe` is the
one lookup by name, with the error a user sees for a typo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sfdaseg.config_base import ConfigError, suggest
from sfdaseg.methods import diga_sf, duda, selftrain, sfda_liu, stvm, unisfda


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
    "duda": Recipe("duda", "DUDA, source-free: large EMA teacher + large auxiliary student + small deployed student; "
                   "gradual large-to-small KL, inconsistency-weighted CE, multiple teachers",
                   duda.DUDAConfig, duda.build),
    "unisfda": Recipe("unisfda", "UniSFDA: MC-dropout-aware fusion of offline (source) and online (EMA) "
                      "pseudo-labels + intra-domain style augmentation; multi-stage with a `stages:` section",
                      unisfda.UniSFDAConfig, unisfda.build),
}


def get_recipe(name: str, *, key: str = "recipe") -> Recipe:
    """The registered recipe ``name``; a :class:`ConfigError` naming ``key`` and the choices otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"{key}: unknown recipe '{name}'; choices: {', '.join(RECIPES)}."
                          f"{suggest(str(name), list(RECIPES))}") from None
