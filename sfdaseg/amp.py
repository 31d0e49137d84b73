"""The one table of mixed-precision modes: ``fp32 | bf16 | fp16`` -> the autocast dtype (``None``: full precision)."""

from __future__ import annotations

import torch

__all__ = ["AMP_DTYPES"]

AMP_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
