"""``sfdaseg export``: an sfdaseg checkpoint -> an ONNX graph, checked against PyTorch with onnxruntime.

The graph has one input and one output::

    image  float32 (B, 3, H, W), RGB in [0, 1]   (the model's normalisation is inside the graph, as in PyTorch)
    logits float32 (B, C, H, W)                  (upsampled bilinearly to the input size inside the graph)

``B`` is always dynamic; ``H`` and ``W`` are dynamic when the architecture allows it. Whether it does is
measured, not assumed: the graph is run at a second size and compared with PyTorch, and a model whose
traced graph baked its input size in is re-exported for the fixed ``size`` (the message says so).

The TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) is the default: it needs nothing
beyond torch and works from torch 2.5 to at least 2.14 (deprecated since 2.9 but kept), while the
``torch.export``-based one needs the ``onnxscript`` package. The file is written next to its destination
under a temporary name and only renamed over ``out`` once the check has passed.

The class spec, model name and input contract travel in the ONNX metadata (key ``"sfdaseg"``, JSON), so
``sfdaseg predict --checkpoint model.onnx`` names and colours classes exactly as with the checkpoint.
"""

from __future__ import annotations

import logging
import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sfdaseg.config import ExportConfig
from sfdaseg.models import load_model
from sfdaseg.storage import CheckpointError, atomic_output

logger = logging.getLogger(__name__)

__all__ = ["ONNX_METADATA_KEY", "ExportError", "ExportResult", "LogitsAtInputSize", "OnnxSegmenter", "compare_onnx",
           "export_checked", "export_onnx", "onnx_opset", "onnx_session", "run_export", "second_size"]

ONNX_METADATA_KEY = "sfdaseg"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


class ExportError(CheckpointError):
    """The model cannot be exported, or its ONNX graph disagrees with PyTorch; the message names the file.

    A :class:`CheckpointError` so that the command line reports it like any other unusable model file.
    """


class LogitsAtInputSize(nn.Module):
    """What the graph computes: RGB ``[0, 1]`` ``(B, 3, H, W)`` -> logits ``(B, C, H, W)``.

    The model's own output is at ``1 / output_stride``; callers of a PyTorch model upsample it themselves, an
    ONNX consumer should not have to, so the bilinear upsampling (the one ``predict_logits`` does) is baked in.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)  # (B, C, H/s, W/s)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


@contextlib.contextmanager
def _quiet_tracing():
    """Hide the warnings every legacy export prints (deprecation notice; shape checks the tracer freezes).

    The shape checks (``x.shape[1] != 3``) are input validation, constant for any valid input, and whether a
    frozen shape matters is measured by :func:`compare_onnx` at a second size instead of guessed from warnings.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        yield


def _has_onnxscript() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    size: Sequence[int],
    dynamic: bool = True,
    opset: int = 17,
    exporter: str = "auto",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (RGB ``[0, 1]`` -> logits) as an ONNX graph that returns logits at the input size.

    Args:
        model: a :class:`SegmentationModel` (any module with that contract); exported in eval mode on the CPU.
        path: the ``.onnx`` file (written directly; :func:`run_export` adds the atomic rename and the check).
        size: ``(H, W)`` of the example input that is traced.
        dynamic: dynamic ``H`` and ``W`` axes (the batch axis is always dynamic).
        opset: ONNX opset (17 or newer).
        exporter: ``"torchscript"`` (``dynamo=False``), ``"dynamo"`` (needs ``onnxscript``) or ``"auto"`` (the
            TorchScript one, or dynamo where a torch without it has dropped it).
        metadata: stored as JSON under the model's metadata key ``"sfdaseg"``.
    """
    path = Path(path)
    graph = LogitsAtInputSize(model).eval().to("cpu", torch.float32)
    h, w = (int(v) for v in size)
    example = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    kinds = {"auto": ("torchscript", "dynamo"), "torchscript": ("torchscript",), "dynamo": ("dynamo",)}[exporter]
    errors = []
    for kind in kinds:
        if kind == "dynamo" and not _has_onnxscript():
            errors.append("the dynamo exporter needs the onnxscript package (pip install onnxscript)")
            continue
        try:
            with _quiet_tracing(), torch.no_grad():
                if kind == "torchscript":
                    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
                    torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=opset,
                                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                      dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes}, do_constant_folding=True)
                else:
                    from torch.export import Dim

                    dims = {0: Dim("batch", min=1)}
                    if dynamic:
                        dims.update({2: Dim("height", min=8), 3: Dim("width", min=8)})
                    # It may raise the opset (onnxscript implements >= 18): run_export reports the file's own.
                    program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=opset,
                                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                                dynamic_shapes={"x": dims}, verbose=False, report=False)
                    program.save(str(path))
            break
        except Exception as e:  # noqa: BLE001 - the exporters raise many types; the next one may work
            errors.append(f"{kind} exporter: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}")
    else:
        raise ExportError(f"could not export model {getattr(model, 'name', type(model).__name__)!r} to {path}: "
                          + "; ".join(errors))
    if metadata:
        import onnx

        proto = onnx.load(str(path))
        entry = proto.metadata_props.add()
        entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(metadata)
        onnx.save(proto, str(path))
    return path


def onnx_opset(path: str | Path) -> int:
    """The default-domain opset an ONNX file was written with."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return max((op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")), default=0)


def onnx_session(path: str | Path, *, device: str = "cpu"):
    """An onnxruntime session on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``).

    ``"auto"`` takes the CUDA execution provider when this onnxruntime has one; ``"cuda"`` without it is an error.
    Intra-op threads follow torch's setting, so ``OMP_NUM_THREADS`` limits both runtimes alike.
    """
    import onnxruntime as ort

    path = Path(path)
    available = ort.get_available_providers()
    providers: list[Any] = ["CPUExecutionProvider"]
    if device != "cpu":
        if "CUDAExecutionProvider" in available:
            index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        elif device != "auto":
            raise ExportError(f"{path}: device {device!r} was asked for, but this onnxruntime has no "
                              f"CUDAExecutionProvider (it has {', '.join(available)}); install onnxruntime-gpu "
                              "or use device=cpu")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only: the CPU provider's notes about unused CUDA are noise here
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise CheckpointError(f"cannot load ONNX model {path}: {type(e).__name__}: {e}") from e


class OnnxSegmenter(nn.Module):
    """An exported ONNX graph behind the model interface of ``predict_logits``: RGB ``[0, 1]`` -> logits.

    ``forward(x)`` runs onnxruntime on ``x`` (any device; the result comes back on it). A graph exported for
    a fixed size gets its input resized to that size; its logits stay at that size and are upsampled by the
    caller, as for a strided PyTorch model.

    Attributes:
        path, session: the file and its onnxruntime session.
        metadata: the ``"sfdaseg"`` metadata written by :func:`export_onnx` (empty for a foreign ONNX file).
        name: model name from the metadata, else the file stem.
        num_classes: ``C`` (the output's channel dimension).
        fixed_size: ``(H, W)`` of a fixed-size graph, else ``None``.
        providers: the execution providers in use.
    """

    def __init__(self, path: str | Path, *, device: str = "cpu") -> None:
        super().__init__()
        self.path = Path(path)
        self.session = onnx_session(self.path, device=device)
        self.providers = list(self.session.get_providers())
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise CheckpointError(f"{self.path}: expected an ONNX graph with one (B, 3, H, W) input, got "
                                  + ", ".join(f"{i.name} {i.shape}" for i in inputs))
        self.input_name = inputs[0].name
        shape = inputs[0].shape
        if isinstance(shape[1], int) and shape[1] != 3:
            raise CheckpointError(f"{self.path}: expected 3 input channels (RGB), the graph takes {shape[1]}")
        self.fixed_size = (shape[2], shape[3]) if all(isinstance(v, int) for v in shape[2:]) else None
        raw = self.session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
        try:
            self.metadata: dict[str, Any] = json.loads(raw) if raw else {}
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.path}: the '{ONNX_METADATA_KEY}' metadata is not valid JSON: {e}") from None
        self.name = str(self.metadata.get("model", self.path.stem))
        channels = outputs[0].shape[1] if len(outputs[0].shape) == 4 else None
        if not isinstance(channels, int):
            classes = self.metadata.get("classes") or {}
            channels = len(classes.get("names") or []) or None
        if channels is None:
            raise CheckpointError(f"{self.path}: cannot tell the number of classes (the output has no fixed "
                                  "channel dimension and the file has no sfdaseg metadata)")
        self.num_classes = int(channels)
        self.output_stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` float RGB in ``[0, 1]`` -> logits ``(B, C, H, W)`` (``fixed_size`` for fixed graphs)."""
        if self.fixed_size is not None and tuple(x.shape[-2:]) != self.fixed_size:
            x = F.interpolate(x, size=self.fixed_size, mode="bilinear", align_corners=False)
        feed = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run(None, {self.input_name: feed})[0]
        return torch.from_numpy(out).to(x.device)


def _ort_logits(session, x: np.ndarray) -> np.ndarray:
    """One onnxruntime forward; a module-level function so tests can stand in a broken runtime."""
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@torch.no_grad()
def compare_onnx(model: nn.Module, session, *, sizes: Sequence[Sequence[int]], batch: int = 2,
                 seed: int = 0) -> list[tuple[float, float]]:
    """``(max |onnxruntime - PyTorch|, max |PyTorch logit|)`` on random RGB inputs, per ``(H, W)`` in ``sizes``.

    The logit scale is returned alongside because float32 rounding grows with it: an untrained deep network
    (logits of 1e4) differs by 1e-2 between two correct runtimes, a trained one (logits of 10) by about 1e-5.

    Raises whatever onnxruntime raises for a size the graph cannot take, or ``ValueError`` when the output
    shape differs from PyTorch's (a graph with a frozen size).
    """
    graph = LogitsAtInputSize(model).eval().to("cpu", torch.float32)
    gen = torch.Generator().manual_seed(seed)
    diffs = []
    for h, w in sizes:
        x = torch.rand(batch, 3, int(h), int(w), generator=gen)
        ref = graph(x).numpy()
        out = _ort_logits(session, x.numpy())
        if out.shape != ref.shape:
            raise ValueError(f"onnxruntime returned logits of shape {out.shape} for input {tuple(x.shape)}, "
                             f"PyTorch {ref.shape}")
        diffs.append((float(np.abs(out.astype(np.float64) - ref).max()), float(np.abs(ref).max())))
    return diffs


def second_size(size: Sequence[int]) -> tuple[int, int]:
    """Another input size for the dynamic-shape check: a different aspect ratio and odd sides."""
    h, w = (int(v) for v in size)
    return max(8, (3 * h) // 4) | 1, (5 * w) // 4 | 1


@dataclass(frozen=True)
class ExportResult:
    path: Path
    dynamic: bool  # dynamic image size (else fixed `size`)
    opset: int  # the file's (the dynamo exporter may raise the one asked for)
    max_abs_diff: float | None  # None when the check was off
    max_abs_logit: float | None  # the scale of the logits compared
    sizes: tuple[tuple[int, int], ...]  # the (H, W) sizes that were checked
    note: str = ""  # why a dynamic export became a fixed one


def export_checked(model: nn.Module, out: str | Path, *, size: Sequence[int], dynamic: bool = True, opset: int = 17,
                   tolerance: float = 1e-3, check: bool = True, exporter: str = "auto",
                   metadata: dict[str, Any] | None = None) -> ExportResult:
    """Export, check with onnxruntime against PyTorch, then move the file to ``out`` (``model`` goes to the CPU).

    With ``dynamic`` the graph is checked at ``size`` and :func:`second_size`; if the second size fails (an
    error, a wrong output shape, or a difference above ``tolerance`` while ``size`` passes), the architecture
    froze its input size and a fixed-size graph is exported instead (``ExportResult.note`` says why).

    Raises:
        ExportError: the export failed, or the difference at ``size`` exceeds ``tolerance`` (nothing is
            written to ``out`` then).
    """
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().to("cpu", torch.float32)
    size = (int(size[0]), int(size[1]))
    name = getattr(model, "name", type(model).__name__)
    note = ""
    with atomic_output(out) as tmp:  # nothing reaches `out` unless the graph is written and checked
        def attempt(dyn: bool) -> tuple[list[tuple[int, int]], list[tuple[float, float]] | None, Exception | None]:
            meta = {**(metadata or {}), "dynamic_size": dyn, "size": list(size)}
            export_onnx(model, tmp, size=size, dynamic=dyn, opset=opset, exporter=exporter, metadata=meta)
            if not check:
                return [], None, None
            session = onnx_session(tmp, device="cpu")
            sizes = [size, second_size(size)] if dyn else [size]
            try:
                return sizes, compare_onnx(model, session, sizes=sizes), None
            except Exception as e:  # noqa: BLE001 - onnxruntime errors for a size the graph cannot take
                return sizes, None, e

        sizes, diffs, err = attempt(dynamic)
        if dynamic and check:
            frozen = err is not None or (diffs is not None and diffs[0][0] <= tolerance < diffs[1][0])
            if frozen:
                why = (f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"
                       if err is not None else f"max abs diff {diffs[1][0]:.3g} at that size")  # type: ignore[index]
                note = (f"model {name!r} cannot take dynamic image sizes in ONNX (its graph failed at "
                        f"{sizes[1][0]}x{sizes[1][1]}: {why}); exported for a fixed {size[0]}x{size[1]} (HxW) "
                        "input instead: resize images to that size, or export with size=[H,W] of your images")
                dynamic = False
                sizes, diffs, err = attempt(False)
        if err is not None:
            raise ExportError(f"onnxruntime cannot run the exported graph of {name!r} ({out}): "
                              f"{type(err).__name__}: {err}") from err
        max_diff = max(d for d, _ in diffs) if diffs else None
        scale = max(m for _, m in diffs) if diffs else None
        if max_diff is not None and max_diff > tolerance:
            raise ExportError(
                f"the ONNX graph of {name!r} disagrees with PyTorch: max abs logit difference {max_diff:.3g} > "
                f"tolerance {tolerance:g} on random inputs of size(s) {', '.join(f'{h}x{w}' for h, w in sizes)} "
                f"(largest |logit| {scale:.3g}, relative difference {max_diff / max(scale, 1e-12):.2g}; float32 "
                f"rounding alone is about 1e-6 relative); {out} was not written (raise tolerance=... only if the "
                "difference is acceptable)"
            )
        opset_written = onnx_opset(tmp)
    return ExportResult(path=out, dynamic=dynamic, opset=opset_written, max_abs_diff=max_diff, max_abs_logit=scale, sizes=tuple(sizes),
                        note=note)


def run_export(cfg: ExportConfig) -> str:
    """Export ``cfg.checkpoint`` to ``cfg.out``; logs the check and returns the ONNX path."""
    model, info = load_model(cfg.checkpoint, map_location="cpu")
    metadata = {
        "format": "sfdaseg-onnx", "version": 1, "model": info.name, "build_args": info.build_args,
        "classes": info.classes.to_dict(), "normalization": info.normalization.to_dict(),
        "input": "float32 RGB in [0, 1], (B, 3, H, W); normalisation inside the graph",
        "output": "float32 logits (B, C, H, W) at the input size",
        "source_checkpoint": str(cfg.checkpoint),
    }
    result = export_checked(model, cfg.out, size=cfg.size, dynamic=cfg.dynamic, opset=cfg.opset,
                            tolerance=cfg.tolerance, check=cfg.check, exporter=cfg.exporter, metadata=metadata)
    if result.note:
        logger.info(f"export: note: {result.note}")
    shape = ("dynamic batch and image size" if result.dynamic
             else f"dynamic batch, fixed image size {cfg.size[0]}x{cfg.size[1]}")
    logger.info(f"export: {info.name} ({info.num_classes} classes) -> {result.path} (opset {result.opset}, {shape})")
    if result.max_abs_diff is not None:
        logger.info(f"export: onnxruntime vs PyTorch on random inputs ({', '.join(f'{h}x{w}' for h, w in result.sizes)}): "
            f"max abs diff {result.max_abs_diff:.3g} (tolerance {cfg.tolerance:g}; largest |logit| "
            f"{result.max_abs_logit:.3g})")
    else:
        logger.info("export: check=false: the graph was not compared with PyTorch")
    return str(result.path)
