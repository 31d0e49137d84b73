"""The checkpoint format: atomic writes, weights-only reads, model round trips and their error messages."""

from __future__ import annotations

import errno
import os
import pickle

import numpy as np
import pytest
import torch

from sfdaseg.data.classes import ClassSpec
from sfdaseg import storage as ckpt
from sfdaseg.models import load_model, save_model
from sfdaseg.storage import CheckpointError, CheckpointNotFoundError, atomic_save, load_state_dict_file, read_checkpoint_info, safe_load
from sfdaseg.models import CAFFE, WeightsError, build_model

CLASSES = ClassSpec(names=("road", "car", "sky"), palette=((1, 2, 3), (4, 5, 6), (7, 8, 9)))


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = build_model("tiny", num_classes=3, width=8)
    with torch.no_grad():  # non-trivial BN statistics: a lost buffer would change the outputs
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture
def x():
    return torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))


class _Evil:
    """Unpickling this runs a shell command that creates a sentinel file."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


# -- atomic_save / safe_load -------------------------------------------------------------------------------


def test_atomic_save_and_safe_load_round_trip(tmp_path):
    obj = {"step": 3, "lr": [0.1, 0.01], "name": "run", "none": None, "w": torch.arange(4.0)}
    path = atomic_save(obj, tmp_path / "sub" / "state.pt")
    assert path == tmp_path / "sub" / "state.pt"
    loaded = safe_load(path)
    assert loaded["step"] == 3 and loaded["lr"] == [0.1, 0.01] and loaded["none"] is None
    torch.testing.assert_close(loaded["w"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]  # no temp file left behind


@pytest.mark.parametrize("target", ["torch.save", "os.replace"])
def test_atomic_save_failure_keeps_the_previous_file(tmp_path, monkeypatch, target):
    path = tmp_path / "state.pt"
    atomic_save({"version": 1}, path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    module, attr = target.split(".")
    monkeypatch.setattr({"torch": torch, "os": os}[module], attr, disk_full)
    with pytest.raises(OSError, match=r"could not write .*state\.pt: No space left on device") as info:
        atomic_save({"version": 2}, path)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert safe_load(path) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_safe_load_missing_file_names_it(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"checkpoint not found: .*nope\.pt"):
        safe_load(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):  # also catchable as the builtin
        load_model(tmp_path / "nope.pt")


def test_truncated_and_empty_files_name_the_file(tmp_path, model):
    path = save_model(tmp_path / "model.pt", model, classes=CLASSES)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*truncated\.pt: the file is truncated"):
        load_model(truncated)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt: the file is empty"):
        safe_load(empty)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match=r"junk\.pt"):
        safe_load(junk)


def test_truncated_safetensors_names_the_file(tmp_path, model):
    path = save_model(tmp_path / "model.safetensors", model, classes=CLASSES)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(path)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_pickle_carrying_code_is_refused_and_not_executed(tmp_path, writer):
    sentinel = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"w": torch.zeros(1)}, "hook": _Evil(sentinel)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pt: it contains Python objects/code") as info:
        safe_load(path)
    assert "system" in str(info.value)  # names what it would have run
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        build_model("tiny", num_classes=3, weights=path)
    assert not sentinel.exists()


def test_safe_load_rejects_non_dict_files(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match=r"list\.pt: expected a dict at the top level, found list"):
        safe_load(path)


# -- model checkpoints ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_model_round_trip(tmp_path, model, x, suffix):
    config = {"train": {"lr": 0.01, "iters": 10}, "seed": 3}
    meta = {"step": 10, "miou": np.float64(0.5), "best": torch.tensor(0.75), "tags": ("a", "b")}
    path = save_model(tmp_path / f"model{suffix}", model, classes=CLASSES, config=config, meta=meta)
    assert path.suffix == suffix and path.exists()
    loaded, info = load_model(path)
    assert type(loaded) is type(model) and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert info.name == "tiny" and info.num_classes == 3 and info.version == 1
    assert info.build_args == model.build_args and info.build_args["width"] == 8
    assert info.classes == CLASSES and info.normalization == model.normalization
    assert info.config == config
    assert info.meta["step"] == 10 and info.meta["miou"] == 0.5 and info.meta["best"] == 0.75
    assert list(info.meta["tags"]) == ["a", "b"]
    assert info.meta["saved_with"]["torch"] == str(torch.__version__)
    assert read_checkpoint_info(path) == info


def test_torch_checkpoint_layout_is_plain(tmp_path, model):
    path = save_model(tmp_path / "model.pt", model, classes=CLASSES)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"format", "version", "model", "classes", "normalization", "config", "meta", "state_dict"}
    assert raw["format"] == "sfdaseg" and raw["version"] == 1
    assert raw["model"] == {"name": "tiny", "build_args": model.build_args}
    assert raw["classes"] == CLASSES.to_dict() and raw["config"] is None
    assert set(raw["state_dict"]) == set(model.state_dict())


def test_safetensors_keeps_metadata_in_the_header(tmp_path, model):
    from safetensors import safe_open

    path = save_model(tmp_path / "model.pt", model, classes=CLASSES, format="safetensors")
    assert path.name == "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert "sfdaseg" in f.metadata()
        assert set(f.keys()) == set(model.state_dict())
    assert load_state_dict_file(path).keys() == model.state_dict().keys()


def test_normalization_travels_with_the_checkpoint(tmp_path, x):
    model = build_model("tiny", num_classes=3, width=8, normalization="caffe").eval()
    loaded, info = load_model(save_model(tmp_path / "caffe.pt", model, classes=CLASSES))
    assert loaded.normalization == CAFFE and info.normalization == CAFFE
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_wrong_num_classes_or_name_names_the_file_and_both_values(tmp_path, model):
    path = save_model(tmp_path / "model.pt", model, classes=CLASSES)
    with pytest.raises(CheckpointError, match=r"model\.pt holds a model with 3 classes, but num_classes=19"):
        load_model(path, num_classes=19)
    with pytest.raises(CheckpointError, match=r"model\.pt holds model 'tiny', but model 'segformer_b0'"):
        load_model(path, name="segformer_b0")
    with pytest.raises(WeightsError, match=r"model\.pt: the weights have 3 classes .*num_classes=19"):
        build_model("tiny", num_classes=19, weights=path)
    with pytest.raises(WeightsError, match=r"model\.pt is a checkpoint of model 'tiny', but model 'lraspp"):
        build_model("lraspp_mobilenet_v3_large", num_classes=3, weights=path)


def test_build_model_from_a_checkpoint_uses_its_build_args(tmp_path, model, x):
    path = save_model(tmp_path / "model.safetensors", model, classes=CLASSES)
    rebuilt = build_model("tiny", num_classes=3, weights=path).eval()  # width=8 comes from the checkpoint
    assert rebuilt.build_args["width"] == 8
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_tampered_state_dict_is_a_clear_error(tmp_path, model):
    sd = model.state_dict()
    sd.pop("classifier.1.bias")
    sd["backbone.stem.0.weight"] = torch.zeros(1)
    obj = {**torch.load(save_model(tmp_path / "a.pt", model, classes=CLASSES), weights_only=True), "state_dict": sd}
    atomic_save(obj, tmp_path / "b.pt")
    expected = r"b\.pt.*backbone\.stem\.0\.weight: file \(1,\).*Missing keys: classifier\.1\.bias"
    with pytest.raises(CheckpointError, match=expected):
        load_model(tmp_path / "b.pt")


def test_foreign_files_are_not_model_checkpoints(tmp_path, model):
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"plain\.pt is not an sfdaseg checkpoint.*build_model"):
        load_model(path)


def test_newer_format_versions_are_refused(tmp_path, model):
    obj = torch.load(save_model(tmp_path / "a.pt", model, classes=CLASSES), weights_only=True)
    atomic_save({**obj, "version": 2}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=r"future\.pt was written by a newer sfdaseg"):
        load_model(tmp_path / "future.pt")


def test_save_model_validates_its_inputs(tmp_path, model):
    with pytest.raises(ValueError, match="the class spec has 2 classes but model 'tiny' outputs 3"):
        save_model(tmp_path / "a.pt", model, classes=ClassSpec(names=("a", "b")))
    with pytest.raises(TypeError, match=r"meta\.opt: checkpoints hold only plain data.*found a object"):
        save_model(tmp_path / "a.pt", model, classes=CLASSES, meta={"opt": object()})
    with pytest.raises(ValueError, match="format must be 'pt' or 'safetensors'"):
        save_model(tmp_path / "a.pt", model, classes=CLASSES, format="onnx")
    assert not list(tmp_path.iterdir())


def test_save_model_unwraps_ddp_like_wrappers(tmp_path, model, x):
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    path = save_model(tmp_path / "w.pt", Wrapper(model), classes=CLASSES)
    loaded, _ = load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_load_state_dict_file_unwraps_training_checkpoints(tmp_path):
    sd = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}, "epoch": 1}, tmp_path / "t.pth")
    assert load_state_dict_file(tmp_path / "t.pth").keys() == sd.keys()
    torch.save({"epoch": 1, "note": "no tensors"}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad\.pth: expected a state dict .*'epoch' holds a int"):
        load_state_dict_file(tmp_path / "bad.pth")


def test_segformer_checkpoint_round_trip(tmp_path, x):
    torch.manual_seed(0)
    model = build_model("segformer_b0", num_classes=3).eval()
    path = save_model(tmp_path / "segformer.safetensors", model, classes=CLASSES)
    loaded, info = load_model(path, name="segformer_b0", num_classes=3)
    assert "transformers" in info.meta["saved_with"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert ckpt.peek_checkpoint_info(path) == info
