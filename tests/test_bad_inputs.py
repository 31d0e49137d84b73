"""A catalogue of bad inputs and faults, driven through the command line in-process (``sfdaseg.cli.main``).

Every case checks two things: the error message names the file or key and what was expected, and nothing
that existed before the command (datasets, checkpoints, earlier runs: every file under the test's folders) was
modified or deleted, and no temporary file was left behind. The runs are tiny (model ``tiny``, 32x64 images,
2 steps) so the whole catalogue takes seconds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import get_worker_info

import sfdaseg.storage as checkpoint_mod
from sfdaseg.cli import main
from sfdaseg.config import TrainSourceConfig, load_config
from sfdaseg.data.classes import CITYSCAPES19, ClassSpec
from sfdaseg.data.datasets import build_dataset
from sfdaseg.models import load_model, save_model
from sfdaseg.storage import safe_load
from sfdaseg.methods.source import SupervisedSegmentation
from sfdaseg.models import build_model
from sfdaseg.offline_labels import (
    CacheEntryError,
    OfflineLabelCache,
    WithOfflineLabels,
    build_offline_labels,
    model_fingerprint,
)
from sfdaseg.runs.train_source import run_train_source

H, W = 32, 64
TINY = ["model.options={width: 8, dropout: 0.0}", "data.num_workers=0", "data.batch_size=2", "data.val=null",
        f"data.synthetic={{size: [{H}, {W}], length: 8}}", f"data.crop=[{H},{W}]", "train.device=cpu",
        "train.progress=false", "train.tensorboard=false", "train.log_every=1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine their spin-waits cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapt_args(tmp: Path, checkpoint: Path, *extra: str) -> list[str]:
    return ["adapt", "--recipe", "selftrain", "--checkpoint", str(checkpoint), "--out", str(tmp / "out"),
            "--iters", "2", f"data.synthetic={{size: [{H}, {W}], length: 4}}", f"data.crop=[{H},{W}]",
            "data.batch_size=2", "data.num_workers=0", f"data.cache_dir={tmp / 'cache'}", "train.device=cpu",
            "train.progress=false", "train.tensorboard=false", "monitor.every=-1", *extra]


def train_args(tmp: Path, *extra: str) -> list[str]:
    return ["train-source", "--out", str(tmp / "out"), "--iters", "2", *TINY, *extra]


# ---------------------------------------------------------------------------------------------------------
# Inputs written into tmp_path
# ---------------------------------------------------------------------------------------------------------


def folder_dataset(root: Path, *, n: int = 4, values=(0, 1, 2), masks: bool = True,
                   names: tuple[str, ...] = ("a", "b", "c")) -> Path:
    """``root/images/im{i}.png``, ``root/masks/im{i}.png`` (class indices) and ``root/classes.yaml``."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        if masks:
            (root / "masks").mkdir(exist_ok=True)
            mask = rng.choice(np.array(values, dtype=np.uint8), (H, W))
            mask[0, : len(values)] = values  # every value appears
            Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    (root / "classes.yaml").write_text("names: [" + ", ".join(f"'{x}'" for x in names) + "]\n")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Things written before each command: source checkpoints and a finished run (never to be modified)."""
    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    save_model(root / "c19.ckpt", build_model("tiny", num_classes=19, width=8), classes=CITYSCAPES19)
    save_model(root / "c5.ckpt", build_model("tiny", num_classes=5, width=8),
               classes=ClassSpec(names=("a", "b", "c", "d", "e")))
    assert main(["train-source", "--out", str(root / "done"), "--iters", "2", "train.ckpt_every=1", *TINY]) == 0
    return root


def snapshot(*roots: Path) -> dict[Path, tuple[int, int, str]]:
    """Size, mtime and content hash of every file under ``roots``."""
    out = {}
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file():
                st = p.stat()
                out[p] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def assert_untouched(before: dict[Path, tuple[int, int, str]], *, may_change: tuple[str, ...] = ()) -> None:
    for p, sig in before.items():
        if p.name in may_change:
            continue
        assert p.exists(), f"{p} existed before the command and was deleted"
        st = p.stat()
        assert (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) == sig, f"{p} was modified"


def leftover_tmp(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------------
# The catalogue: one row per bad input. setup(tmp, world, monkeypatch) writes the input and returns argv.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    setup: Callable[[Path, Path, pytest.MonkeyPatch], list[str]]
    patterns: list[str]  # regexes the error output must match (templated with {tmp} and {world})
    rc: int = 2
    raises: type[BaseException] | None = None  # the exception main() lets through instead of a return code
    may_change: tuple[str, ...] = ()  # pre-existing files the command may rewrite (resume rewrites config.yaml)
    no_out: bool = False  # the error comes before any work: no run folder may be created
    check: Callable[[Path, Path], None] | None = None  # extra assertions after the command


def _missing_root(tmp, world, mp):
    return train_args(tmp, "--data", f"folder:{tmp / 'nowhere'}")


def _no_masks_folder(tmp, world, mp):
    folder_dataset(tmp / "ds", masks=False)
    return train_args(tmp, "--data", f"folder:{tmp / 'ds'}")


def _image_without_mask(tmp, world, mp):
    folder_dataset(tmp / "ds")
    (tmp / "ds" / "masks" / "im1.png").unlink()
    return train_args(tmp, "--data", f"folder:{tmp / 'ds'}")


def _mask_of_another_size(tmp, world, mp):
    folder_dataset(tmp / "ds")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp / "ds" / "masks" / "im1.png")
    return train_args(tmp, "--data", f"folder:{tmp / 'ds'}", "data.batch_size=4")


def _labels_outside_spec(tmp, world, mp):
    folder_dataset(tmp / "ds", values=(0, 1, 2, 7))
    return train_args(tmp, "--data", f"folder:{tmp / 'ds'}")


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _truncated_png(tmp, world, mp):
    folder_dataset(tmp / "ds")
    _truncate(tmp / "ds" / "images" / "im2.png", 300)
    return train_args(tmp, "--data", f"folder:{tmp / 'ds'}", "data.batch_size=4")


def _zero_byte_image(tmp, world, mp):
    folder_dataset(tmp / "ds")
    (tmp / "ds" / "images" / "im3.png").write_bytes(b"")
    return train_args(tmp, "--data", f"folder:{tmp / 'ds'}", "data.batch_size=4")


def _zero_byte_mask(tmp, world, mp):
    folder_dataset(tmp / "ds")
    (tmp / "ds" / "masks" / "im0.png").write_bytes(b"")
    return train_args(tmp, "--data", f"folder:{tmp / 'ds'}", "data.batch_size=4")


def _empty_folder(tmp, world, mp):
    (tmp / "ds" / "images").mkdir(parents=True)
    (tmp / "ds" / "masks").mkdir()
    (tmp / "ds" / "classes.yaml").write_text("names: [a, b, c]\n")
    return train_args(tmp, "--data", f"folder:{tmp / 'ds'}")


def _bad_classes_yaml(tmp, world, mp):
    folder_dataset(tmp / "ds")
    (tmp / "ds" / "classes.yaml").write_text("nmes: [a, b, c]\n")
    return train_args(tmp, "--data", f"folder:{tmp / 'ds'}")


def _unknown_dataset_kind(tmp, world, mp):
    return train_args(tmp, "--data", f"foldr:{tmp}")


def _sizes_differ_without_crop(tmp, world, mp):
    folder_dataset(tmp / "ds", n=2)
    Image.fromarray(np.zeros((H, W // 2, 3), np.uint8)).save(tmp / "ds" / "images" / "im1.png")
    Image.fromarray(np.zeros((H, W // 2), np.uint8)).save(tmp / "ds" / "masks" / "im1.png")
    return train_args(tmp, "--data", f"folder:{tmp / 'ds'}", "data.crop=null", "data.scale_range=[1.0,1.0]")


def _config_file(tmp: Path, text: str) -> Path:
    (tmp / "c.yaml").write_text(text)
    return tmp / "c.yaml"


def _unknown_config_key(tmp, world, mp):
    return train_args(tmp, "--config", str(_config_file(tmp, "train:\n  iterz: 3\n")))


def _wrong_type_in_yaml(tmp, world, mp):
    return train_args(tmp, "--config", str(_config_file(tmp, "data:\n  batch_size: two\n")))


def _invalid_yaml(tmp, world, mp):
    return train_args(tmp, "--config", str(_config_file(tmp, "train: {iters: [1, 2\n")))


def _missing_config_file(tmp, world, mp):
    return train_args(tmp, "--config", str(tmp / "absent.yaml"))


def _iters_zero(tmp, world, mp):
    return train_args(tmp) + ["--iters", "0"]  # a flag given twice: the last one wins


def _iters_negative(tmp, world, mp):
    return train_args(tmp) + ["--iters=-3"]


def _checkpoint_of_other_classes_adapt(tmp, world, mp):
    return adapt_args(tmp, world / "c5.ckpt", "data.val=synthetic:target:val")


def _checkpoint_of_other_classes_evaluate(tmp, world, mp):
    return ["evaluate", "--checkpoint", str(world / "c5.ckpt"), "--data", "synthetic:target:val",
            f"synthetic={{size: [{H}, {W}], length: 4}}", "num_workers=0", "device=cpu"]


def _weights_of_other_classes(tmp, world, mp):
    folder_dataset(tmp / "ds")  # 3 classes
    return train_args(tmp, "--data", f"folder:{tmp / 'ds'}", "--weights", str(world / "c19.ckpt"))


def _weights_of_other_architecture(tmp, world, mp):
    obj = safe_load(world / "c19.ckpt")
    obj["model"]["name"] = "lraspp_mobilenet_v3_large"  # the header of another architecture
    torch.save(obj, tmp / "mobilenet.ckpt")
    return train_args(tmp, "--weights", str(tmp / "mobilenet.ckpt"))


def _weights_of_other_width(tmp, world, mp):
    return train_args(tmp, "--weights", str(world / "c19.ckpt"), "model.options={width: 16, dropout: 0.0}")


def _truncated_checkpoint(tmp, world, mp):
    (tmp / "cut.ckpt").write_bytes((world / "c19.ckpt").read_bytes()[:5000])
    return adapt_args(tmp, tmp / "cut.ckpt")


def _zero_byte_checkpoint(tmp, world, mp):
    (tmp / "empty.ckpt").write_bytes(b"")
    return adapt_args(tmp, tmp / "empty.ckpt")


class _RunsCode:
    """Unpickling this object runs ``os.system`` (it must never happen)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_carrying_code(tmp, world, mp):
    obj = safe_load(world / "c19.ckpt")
    obj["meta"] = {"payload": _RunsCode(tmp / "pwned")}
    torch.save(obj, tmp / "evil.ckpt")
    return adapt_args(tmp, tmp / "evil.ckpt")


def _check_no_code_ran(tmp):
    assert not (tmp / "pwned").exists(), "the pickle's code ran"


def _plain_state_dict(tmp, world, mp):
    torch.save(build_model("tiny", num_classes=19, width=8).state_dict(), tmp / "plain.pt")
    return adapt_args(tmp, tmp / "plain.pt")


def _missing_checkpoint(tmp, world, mp):
    return adapt_args(tmp, tmp / "absent.ckpt")


def _copy_done_run(tmp: Path, world: Path) -> Path:
    shutil.copytree(world / "done", tmp / "out")  # copy2 keeps mtimes; the copy is what must stay intact
    return tmp / "out"


def _resume_truncated_state(tmp, world, mp):
    run = _copy_done_run(tmp, world)
    _truncate(run / "state.pt", 3000)
    return train_args(tmp, "--resume") + ["--iters", "4"]


def _resume_other_architecture(tmp, world, mp):
    _copy_done_run(tmp, world)
    return train_args(tmp, "--resume", "model.options={width: 16, dropout: 0.0}") + ["--iters", "4"]


def _existing_run_train(tmp, world, mp):
    _copy_done_run(tmp, world)
    return train_args(tmp)


def _existing_run_adapt(tmp, world, mp):
    _copy_done_run(tmp, world)
    return adapt_args(tmp, world / "c19.ckpt")


def _out_under_a_file(tmp, world, mp):
    (tmp / "afile").write_text("not a folder")
    return train_args(tmp, "--out", str(tmp / "afile" / "run"))


def _unwritable_out(tmp, world, mp):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop root from writing")
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o500)
    return train_args(tmp, "--out", str(tmp / "ro" / "run"))


def _nan_at_step_3(mp):
    original = SupervisedSegmentation.training_step

    def nan_at_3(self, batch, step):
        out = original(self, batch, step)
        if step == 3:
            out.loss = out.loss * float("nan")
        return out

    mp.setattr(SupervisedSegmentation, "training_step", nan_at_3)


def _nan_stop(tmp, world, mp):
    _nan_at_step_3(mp)
    return train_args(tmp, "train.ckpt_every=2") + ["--iters", "6"]


def _check_nan_stop(tmp, world):
    state = safe_load(tmp / "out" / "state.pt")
    assert state["step"] == 2  # the last good checkpoint, not overwritten by a NaN step
    assert all(torch.isfinite(v).all() for v in state["modules"]["model"].values() if v.is_floating_point())
    assert not (tmp / "out" / "model.ckpt").exists()


def _nan_skip(tmp, world, mp):
    _nan_at_step_3(mp)
    return train_args(tmp, "train.on_nan=skip") + ["--iters", "6"]


def _check_nan_skip(tmp, world):
    model, _ = load_model(tmp / "out" / "model.ckpt")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def _in_worker_only(mp, action: Callable[[], None]) -> None:
    """Make the built-in benchmark's ``__getitem__`` run ``action`` inside DataLoader workers."""
    if torch.multiprocessing.get_start_method() != "fork":
        pytest.skip("the patched dataset reaches the workers only with the fork start method")
    from sfdaseg.data.synthetic import SyntheticDataset

    original = SyntheticDataset.__getitem__

    def getitem(self, index):
        if get_worker_info() is not None:
            action()
        return original(self, index)

    mp.setattr(SyntheticDataset, "__getitem__", getitem)


def _worker_raises(tmp, world, mp):
    def fail():
        raise ValueError("sample decoder exploded")

    _in_worker_only(mp, fail)
    return train_args(tmp, "data.num_workers=1")


def _worker_dies(tmp, world, mp):
    _in_worker_only(mp, lambda: os._exit(3))
    return train_args(tmp, "data.num_workers=1")


def _bad_file_in_worker(tmp, world, mp):
    folder_dataset(tmp / "ds")
    _truncate(tmp / "ds" / "images" / "im2.png", 300)
    return train_args(tmp, "--data", f"folder:{tmp / 'ds'}", "data.batch_size=4", "data.num_workers=1")


def _target_labels_garbage(tmp, world, mp):
    folder_dataset(tmp / "target", names=CITYSCAPES19.names)
    for p in (tmp / "target" / "masks").iterdir():
        p.write_bytes(b"not a png")
    import sfdaseg.data.datasets as datasets_mod

    def no_labels(*args, **kwargs):
        raise AssertionError("a target label file was decoded during adaptation")

    mp.setattr(datasets_mod, "decode_label", no_labels)
    return adapt_args(tmp, world / "c19.ckpt", "--target", f"folder:{tmp / 'target'}")


def _target_without_label_folder(tmp, world, mp):
    folder_dataset(tmp / "target", masks=False)
    (tmp / "target" / "classes.yaml").unlink()
    return adapt_args(tmp, world / "c19.ckpt", "--target", f"folder:{tmp / 'target'}")


def _check_adapted(tmp, world):
    model, info = load_model(tmp / "out" / "model.ckpt")
    assert info.num_classes == 19


class _FullDisk:
    """Stands in for ``os`` in sfdaseg.storage: the ``n``-th file written atomically fills the disk half-way."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def fdopen(self, *args, **kwargs):
        f = os.fdopen(*args, **kwargs)
        self.calls += 1
        return _FillingFile(f) if self.calls == self.n else f


class _FillingFile:
    def __init__(self, f, budget: int = 4096) -> None:
        self.f, self.budget = f, budget

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.budget:
            self.f.write(data[: self.budget])
            self.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _disk_full(tmp, world, mp):
    mp.setattr(checkpoint_mod, "os", _FullDisk(n=3))  # after config.yaml and state.pt at step 2: state.pt at step 4 fails
    return train_args(tmp, "train.ckpt_every=2") + ["--iters", "6"]


def _check_disk_full(tmp, world):
    assert safe_load(tmp / "out" / "state.pt")["step"] == 2  # the previous checkpoint, intact and loadable
    assert not (tmp / "out" / "model.ckpt").exists()


CASES = {
    # ---- datasets
    "missing dataset root": Case(_missing_root, [r"{tmp}/nowhere does not exist", "Expected layout"], no_out=True),
    "images without a masks folder": Case(_no_masks_folder, [r"{tmp}/ds/masks does not exist", "masks folder"],
                                          no_out=True),
    "an image without its mask": Case(_image_without_mask,
                                      [r"{tmp}/ds/images/im1\.png -> expected {tmp}/ds/masks/im1\.png"], no_out=True),
    "mask of another size": Case(_mask_of_another_size, [
        r"{tmp}/ds/images/im1\.png is 64x32 \(WxH\) but {tmp}/ds/masks/im1\.png is 16x16", "expected the same size"]),
    "label values outside the class spec": Case(_labels_outside_spec, [
        r"{tmp}/ds/masks/im\d\.png: label values outside the class spec: 7", r"expected class indices 0\.\.2"]),
    "truncated PNG": Case(_truncated_png, [r"{tmp}/ds/images/im2\.png: cannot decode image", "truncated"]),
    "zero-byte image": Case(_zero_byte_image, [r"{tmp}/ds/images/im3\.png: zero-byte file, expected an image"]),
    "zero-byte mask": Case(_zero_byte_mask, [r"{tmp}/ds/masks/im0\.png: zero-byte file, expected an image"]),
    "empty folder": Case(_empty_folder, [r"{tmp}/ds/images: no files ending with \.png"], no_out=True),
    "classes.yaml with a misspelt key": Case(_bad_classes_yaml, [r"{tmp}/ds/classes\.yaml: unknown key\(s\) \['nmes'\]",
                                                           "expected some of"], no_out=True),
    "unknown dataset kind": Case(_unknown_dataset_kind, ["data.train: unknown dataset kind 'foldr'",
                                                         "did you mean 'folder'"], no_out=True),
    "images of different sizes and no crop": Case(_sizes_differ_without_crop, [
        r"a training batch holds images of different sizes \[\(32, 32\), \(32, 64\)\]", r"set data\.crop=\[H, W\]"]),
    # ---- configs
    "unknown config key": Case(_unknown_config_key, [r"unknown key 'train\.iterz' in {tmp}/c\.yaml",
                                                     "Did you mean: iters"], no_out=True),
    "wrong type in YAML": Case(_wrong_type_in_yaml, [
        r"data\.batch_size: expected int, got 'two' \(str\) in {tmp}/c\.yaml"], no_out=True),
    "invalid YAML": Case(_invalid_yaml, [r"{tmp}/c\.yaml: not valid YAML"], no_out=True),
    "missing config file": Case(_missing_config_file, [r"config file not found: {tmp}/absent\.yaml"], no_out=True),
    "--iters 0": Case(_iters_zero, [r"train\.iters: expected a positive number of iterations, got 0"], no_out=True),
    "--iters negative": Case(_iters_negative, [r"train\.iters: expected a positive number of iterations, got -3"],
                             no_out=True),
    # ---- checkpoints
    "checkpoint of another number of classes (adapt)": Case(_checkpoint_of_other_classes_adapt, [
        r"synthetic:target:val: 19 classes, the model has 5"]),
    "checkpoint of another number of classes (evaluate)": Case(_checkpoint_of_other_classes_evaluate, [
        r"checkpoint {world}/c5\.ckpt predicts 5 classes, but dataset synthetic:target:val has 19"]),
    "weights of another number of classes": Case(_weights_of_other_classes, [
        r"{world}/c19\.ckpt: the weights have 19 classes but the model was asked for num_classes=3"], no_out=True),
    "weights of another architecture": Case(_weights_of_other_architecture, [
        r"{tmp}/mobilenet\.ckpt is a checkpoint of model 'lraspp_mobilenet_v3_large', but model 'tiny' was "
        r"requested"], no_out=True),
    "weights of another model width": Case(_weights_of_other_width, [
        r"{world}/c19\.ckpt: the weights do not fit a state dict of model 'tiny'", "Shape mismatches"], no_out=True),
    "truncated checkpoint": Case(_truncated_checkpoint, [
        r"cannot read checkpoint {tmp}/cut\.ckpt: the file is truncated or corrupt"], no_out=True),
    "zero-byte checkpoint": Case(_zero_byte_checkpoint, [
        r"cannot read checkpoint {tmp}/empty\.ckpt: the file is empty"], no_out=True),
    "pickle carrying code": Case(_pickle_carrying_code, [
        r"refusing to load {tmp}/evil\.ckpt: it contains Python objects/code", r"weights_only=True"],
        check=lambda tmp, world: _check_no_code_ran(tmp), no_out=True),
    "plain state dict as --checkpoint": Case(_plain_state_dict, [r"{tmp}/plain\.pt is not an sfdaseg checkpoint"], no_out=True),
    "missing checkpoint": Case(_missing_checkpoint, [r"checkpoint: no such file: {tmp}/absent\.ckpt"], no_out=True),
    "resume from a truncated state.pt": Case(_resume_truncated_state, [
        r"cannot read checkpoint {tmp}/out/state\.pt: the file is truncated or corrupt"], may_change=("config.yaml",)),
    "resume with another architecture": Case(_resume_other_architecture, [
        r"{tmp}/out/state\.pt: the saved run does not fit this run's model", "size mismatch"],
        may_change=("config.yaml",)),
    # ---- run folders
    "--out holds a run (train-source)": Case(_existing_run_train, [
        r"--out {tmp}/out: this folder already holds a run \(config\.yaml, state\.pt, model\.ckpt\)", "resume=true"]),
    "--out holds a run (adapt)": Case(_existing_run_adapt, [r"--out {tmp}/out: this folder already holds a run"]),
    "--out under a file": Case(_out_under_a_file, [r"--out {tmp}/afile/run: cannot write there \(Not a directory\)"]),
    "unwritable --out": Case(_unwritable_out, [r"--out {tmp}/ro/run: cannot write there \(Permission denied\)"]),
    # ---- faults during training
    "NaN loss, train.on_nan=stop": Case(_nan_stop, [
        r"non-finite loss at step 3; stopped, the last good checkpoint \(step 2\) is kept at {tmp}/out/state\.pt",
        r"train\.on_nan=skip"], rc=1, check=_check_nan_stop),
    "NaN loss, train.on_nan=skip": Case(_nan_skip, [r"non-finite loss at step 3; step skipped"], rc=0,
                                         check=_check_nan_skip),
    "disk full while saving a checkpoint": Case(_disk_full, [
        r"could not write {tmp}/out/state\.pt: No space left on device; the previous state\.pt is unchanged",
        r"rerun with --resume"], rc=1, check=_check_disk_full),
    "DataLoader worker raises": Case(_worker_raises, [
        r"Caught ValueError in DataLoader worker process 0", "sample decoder exploded"], raises=ValueError),
    "DataLoader worker dies": Case(_worker_dies, [
        r"DataLoader worker \(pid\(s\) \d+\) exited unexpectedly", r"data\.num_workers=0"], raises=RuntimeError),
    # A worker's DatasetError reaches the user as the same one line as in the main process (no worker traceback).
    "unreadable file read in a worker": Case(_bad_file_in_worker, [
        r"(?m)^sfdaseg train-source: error: {tmp}/ds/images/im2\.png: cannot decode image[^\n]*\n?\Z"]),
    # ---- target labels are never read
    "target labels given but garbage": Case(_target_labels_garbage, [r"labels not read"], rc=0, check=_check_adapted),
    "target without labels or classes.yaml": Case(_target_without_label_folder, [r"labels not read"], rc=0,
                                                  check=_check_adapted),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, world, monkeypatch, capsys):
    case = CASES[name]
    argv = case.setup(tmp_path, world, monkeypatch)
    before = snapshot(tmp_path, world)
    if case.raises is not None:
        with pytest.raises(case.raises) as err:
            main(argv)
        text = str(err.value)
    else:
        rc = main(argv)
        text = capsys.readouterr().err
        assert rc == case.rc, f"exit code {rc}, expected {case.rc}; stderr:\n{text[-3000:]}"
    for pattern in case.patterns:
        pattern = pattern.replace("{tmp}", re.escape(str(tmp_path))).replace("{world}", re.escape(str(world)))
        assert re.search(pattern, text), f"{pattern!r} not found in:\n{text[-3000:]}"
    assert_untouched(before, may_change=case.may_change)
    assert not leftover_tmp(tmp_path, world)
    if case.no_out:
        assert not (tmp_path / "out").exists(), "a refused command left a run folder behind"
    if case.check is not None:
        case.check(tmp_path, world)


def test_the_catalogue_is_long_enough():
    assert len(CASES) >= 20


# ---------------------------------------------------------------------------------------------------------
# Disk full through the trainer: the last checkpoint survives, and a resume ends where an uninterrupted run does
# ---------------------------------------------------------------------------------------------------------


def small_cfg(tmp_path, name, *extra):
    overrides = [o for o in TINY if not o.startswith("data.num_workers")]
    return load_config(TrainSourceConfig, overrides=[*overrides, "data.num_workers=0", "train.iters=6",
                                                     "train.ckpt_every=2", f"train.out={tmp_path / name}", *extra])


def test_disk_full_keeps_the_last_checkpoint_and_the_run_resumes(tmp_path, monkeypatch):
    full = run_train_source(small_cfg(tmp_path, "full"))

    monkeypatch.setattr(checkpoint_mod, "os", _FullDisk(n=3))  # config.yaml, state.pt at step 2, then state.pt at step 4 fails
    with pytest.raises(OSError) as err:
        run_train_source(small_cfg(tmp_path, "cut"))
    state = tmp_path / "cut" / "state.pt"
    assert err.value.errno == errno.ENOSPC
    assert f"could not write {state}: No space left on device" in str(err.value)
    assert safe_load(state)["step"] == 2
    assert not leftover_tmp(tmp_path) and not (tmp_path / "cut" / "model.ckpt").exists()

    monkeypatch.setattr(checkpoint_mod, "os", os)  # space freed
    resumed = run_train_source(small_cfg(tmp_path, "cut", "train.resume=true"))
    a, b = load_model(full)[0].state_dict(), load_model(resumed)[0].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the steps logged after the last good checkpoint are not duplicated


def test_a_serializer_error_behind_a_full_disk_is_reported_as_the_os_error(tmp_path, monkeypatch):
    """torch.save turns a failing file.write into an unrelated RuntimeError; the OS error is what is reported."""
    checkpoint_mod.atomic_save({"x": torch.zeros(4)}, tmp_path / "a.pt")
    before = (tmp_path / "a.pt").read_bytes()
    monkeypatch.setattr(checkpoint_mod, "os", _FullDisk(n=1))
    with pytest.raises(OSError, match=r"a\.pt: No space left on device; the previous a\.pt is unchanged") as err:
        checkpoint_mod.atomic_save({"x": torch.zeros(100_000)}, tmp_path / "a.pt")
    assert err.value.errno == errno.ENOSPC
    assert (tmp_path / "a.pt").read_bytes() == before and not leftover_tmp(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# The offline pseudo-label cache: a corrupt or stale entry is detected and rebuilt, never silently used
# ---------------------------------------------------------------------------------------------------------


class CountImages:
    def __init__(self, model: nn.Module) -> None:
        self.images = 0
        model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.images += args[0].shape[0]


def _replace_png(path: Path, array: np.ndarray, text: dict[str, str]) -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    Image.fromarray(array).save(path, pnginfo=info)


def _fingerprint_text(cache: OfflineLabelCache) -> dict[str, str]:
    return {"sfdaseg-fingerprint": cache.fingerprint}


def _damage_truncated_label(cache, names):
    _truncate(cache.label_path(names[1]), 60)
    return [names[1]]


def _damage_truncated_label_keeps_header(cache, names):
    path = cache.label_path(names[1])
    _truncate(path, len(path.read_bytes()) - 12)  # only the IEND chunk cut: Pillow alone would not notice
    return [names[1]]


def _damage_conf_of_another_size(cache, names):
    _replace_png(cache.conf_path(names[2]), np.zeros((H // 2, W // 2), np.uint8), _fingerprint_text(cache))
    return [names[2]]


def _damage_label_of_another_model(cache, names):
    label = np.array(Image.open(cache.label_path(names[0])))
    _replace_png(cache.label_path(names[0]), label, {"sfdaseg-fingerprint": "0" * 64})
    return [names[0]]


def _damage_label_without_fingerprint(cache, names):
    _replace_png(cache.label_path(names[3]), np.zeros((H, W), np.uint8), {})
    return [names[3]]


def _damage_not_a_png(cache, names):
    cache.conf_path(names[1]).write_bytes(b"\x89PNG but not really")
    return [names[1]]


def _damage_entry_missing(cache, names):
    cache.label_path(names[0]).unlink()
    cache.conf_path(names[3]).unlink()
    return [names[0], names[3]]


def _damage_manifest_of_another_model(cache, names):
    data = json.loads(cache.manifest_path.read_text())
    data["fingerprint"] = "f" * 64
    cache.manifest_path.write_text(json.dumps(data))
    return []  # every entry is still valid (checked one by one): nothing is recomputed, the manifest is rewritten


def _damage_malformed_manifest(cache, names):
    data = json.loads(cache.manifest_path.read_text())
    data["entries"] = {names[0]: "32x64"}
    cache.manifest_path.write_text(json.dumps(data))
    return []


def _damage_manifest_missing(cache, names):
    cache.manifest_path.unlink()
    return []


CACHE_DAMAGE = {
    "truncated label PNG": _damage_truncated_label,
    "label PNG without its IEND chunk": _damage_truncated_label_keeps_header,
    "conf PNG of the wrong size": _damage_conf_of_another_size,
    "label PNG of another model": _damage_label_of_another_model,
    "label PNG without a fingerprint": _damage_label_without_fingerprint,
    "conf file not a PNG": _damage_not_a_png,
    "entries missing": _damage_entry_missing,
    "manifest of another fingerprint": _damage_manifest_of_another_model,
    "malformed manifest": _damage_malformed_manifest,
    "manifest missing": _damage_manifest_missing,
}


@pytest.mark.parametrize("damage", list(CACHE_DAMAGE))
def test_offline_cache_damage_is_detected_and_rebuilt(tmp_path, damage):
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=19, width=8)
    with torch.no_grad():  # sharper logits than the N(0, 0.01) init: no near-ties that batch composition could flip
        model.classifier[1].weight.mul_(100.0)
    dataset = build_dataset("synthetic:target:train", with_labels=False, options={"size": [H, W], "length": 4})
    cache = OfflineLabelCache(tmp_path, fingerprint=model_fingerprint(model))
    build_offline_labels(model, dataset, cache, device="cpu", batch_size=4)
    names = dataset.names
    good = {n: cache.get(n) for n in names}

    broken = CACHE_DAMAGE[damage](cache, names)
    for name in broken:  # a damaged entry is never served
        with pytest.raises(CacheEntryError, match=re.escape(str(cache.folder))):
            cache.get(name)
    if damage.startswith(("manifest", "malformed", "entries")):
        with pytest.raises(CacheEntryError, match="build_offline_labels"):
            WithOfflineLabels(dataset, cache)
    stamps = {p: p.stat().st_mtime_ns for n in names if n not in broken
              for p in (cache.label_path(n), cache.conf_path(n))}

    counter = CountImages(model)
    build_offline_labels(model, dataset, cache, device="cpu", batch_size=1)
    assert counter.images == len(broken)  # exactly the damaged entries are recomputed
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the valid ones are kept as they were
    ds = WithOfflineLabels(dataset, cache)
    for i, name in enumerate(names):
        label, conf = cache.get(name)  # recomputed in other batches: CPU kernels may round the last bit differently
        assert torch.equal(label, good[name][0]) and (conf.int() - good[name][1].int()).abs().max() <= 1
        assert torch.equal(ds[i]["pl_label"], label)
    assert not leftover_tmp(tmp_path)


def test_adapt_rebuilds_a_corrupt_cache_entry(tmp_path, world, capsys):
    """End to end: a cached pseudo-label truncated between two diga_sf runs is rebuilt by the second run."""
    args = ["--recipe", "diga_sf", "method.proto_init_images=4"]
    assert main(adapt_args(tmp_path, world / "c19.ckpt", *args)) == 0
    files = sorted((tmp_path / "cache").rglob("*.label.png"))
    assert len(files) == 4
    _truncate(files[1], 100)
    stamps = {f: f.stat().st_mtime_ns for f in files if f != files[1]}
    assert main(adapt_args(tmp_path, world / "c19.ckpt", *args, "--out", str(tmp_path / "again"))) == 0
    with Image.open(files[1]) as rebuilt:  # rebuilt: a complete PNG of the image's size, of this model
        rebuilt.load()
        assert rebuilt.size == (W, H)
        with Image.open(files[0]) as other:
            assert rebuilt.text["sfdaseg-fingerprint"] == other.text["sfdaseg-fingerprint"]
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps  # the others reused


def test_a_worker_error_is_one_line_unless_debugging(tmp_path, monkeypatch, capsys):
    argv = _bad_file_in_worker(tmp_path, tmp_path, monkeypatch)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "DataLoader worker" not in err
    monkeypatch.setenv("SFDASEG_DEBUG", "1")  # the worker's traceback, for a bug report
    assert main(argv + [f"train.out={tmp_path / 'again'}"]) == 2
    assert "Original Traceback" in capsys.readouterr().err
