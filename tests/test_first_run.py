"""A user's own folder dataset works with the first command they type (the README's Data section), and nothing
a dataset holds is dropped without a word."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfdaseg.cli import main
from sfdaseg.data.datasets import DatasetWarning, build_dataset
from sfdaseg.data.stats import inverse_frequency_weights, log_frequency_weights
from sfdaseg.losses import ohem_cross_entropy, seg_cross_entropy
from sfdaseg.methods.source import SupervisedSegmentation
from sfdaseg.models import MODELS, build_model, load_model, model_options

ROOT = Path(__file__).resolve().parents[1]
H, W = 48, 64
PALETTE = [[0, 0, 0], [220, 20, 60], [0, 0, 142]]


def write_folder(root, *, n: int = 6, colour: bool = False, seed: int = 0) -> None:
    """``root/images`` (one size), ``root/masks`` and ``classes.yaml``: a background and two thin classes."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = np.zeros((H, W), np.uint8)
        for cls in (1, 2):
            r = int(rng.integers(2, H - 2))
            mask[r:r + 2, 4:W - 4] = cls  # thin stripes: about 8% of the pixels
        img = np.stack([mask * 90 + rng.integers(0, 40, (H, W)) for _ in range(3)], axis=-1).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        if colour:
            Image.fromarray(np.asarray(PALETTE, np.uint8)[mask]).save(root / "masks" / f"im{i}.png")
        else:
            Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    extra = f"palette: {PALETTE}\nmask_format: color\n" if colour else ""
    (root / "classes.yaml").write_text("names: [background, crack, wire]\n" + extra)


def readme_first_commands() -> list[list[str]]:
    """The ``sfdaseg`` commands of the README's "Your own data, first commands" block, ``--iters`` made tiny."""
    text = (ROOT / "README.md").read_text()
    block = text.split("### Your own data, first commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.strip().splitlines():
        argv = shlex.split(line.split("#", 1)[0])
        assert argv[0] == "sfdaseg", line
        if "--iters" in argv:
            argv[argv.index("--iters") + 1] = "3"
        commands.append(argv[1:])
    return commands


def test_the_readmes_first_commands_run_on_a_fresh_folder(tmp_path, capsys, monkeypatch):
    """No crop, no val split, no other option: train-source, adapt and evaluate as the README writes them."""
    write_folder(tmp_path / "D" / "train")
    write_folder(tmp_path / "D" / "val", n=3, seed=1)
    write_folder(tmp_path / "T", n=3, seed=2)
    for p in (tmp_path / "T" / "masks").iterdir():  # unlabelled target images
        p.unlink()
    (tmp_path / "T" / "masks").rmdir()
    monkeypatch.chdir(tmp_path)
    train, adapt, evaluate = readme_first_commands()
    assert train[:1] == ["train-source"] and adapt[:1] == ["adapt"] and evaluate[:1] == ["evaluate"]
    assert main(train) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "R/model.ckpt"
    assert load_model("R/model.ckpt")[1].classes.names == ("background", "crack", "wire")
    assert not (tmp_path / "R" / "eval.json").exists()  # no val split given: none is invented
    assert main(adapt) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == "A/model.ckpt"
    assert "fewer than one batch" in err  # 3 target images, batch 4: said, not hidden
    assert json.loads((tmp_path / "A" / "metrics.json").read_text())["guard"]["delivered_step"] is not None
    assert main(evaluate) == 0 and "mIoU" in capsys.readouterr().err


def test_built_in_benchmark_keeps_its_own_val_split_by_default():
    from sfdaseg.config import DataConfig

    assert DataConfig(train="synthetic:target:train").val_split() == "synthetic:target:val"
    assert DataConfig(train="folder:/data/x").val_split() is None
    assert DataConfig(train="folder:/data/x", val="folder:/data/y").val_split() == "folder:/data/y"


def test_colour_masks_map_through_the_palette_and_unknown_colours_are_counted(tmp_path):
    write_folder(tmp_path, n=2, colour=True)
    mask = np.asarray(Image.open(tmp_path / "masks" / "im0.png")).copy()
    mask[0, :5] = (1, 2, 3)  # a colour of no class
    Image.fromarray(mask).save(tmp_path / "masks" / "im0.png")
    ds = build_dataset(f"folder:{tmp_path}")
    with pytest.warns(DatasetWarning, match=r"im0\.png: 5 pixel\(s\) of 1 colour\(s\) not in the palette \(\(1, 2, 3\)\)"):
        m = ds[0]["mask"]
    assert m.dtype == torch.uint8 and set(torch.unique(m).tolist()) <= {0, 1, 2, 255}
    assert (m[0, :5] == 255).all() and int((m == 1).sum()) > 0 and int((m == 2).sum()) > 0
    (tmp_path / "classes.yaml").write_text("names: [a, b, c]\nmask_format: color\n")
    with pytest.raises(ValueError, match="mask_format: color needs key 'palette'"):
        build_dataset(f"folder:{tmp_path}")


def test_broken_links_and_label_free_masks_are_reported(tmp_path, capsys):
    write_folder(tmp_path / "D", n=5)
    (tmp_path / "D" / "images" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    Image.fromarray(np.full((H, W), 255, np.uint8)).save(tmp_path / "D" / "masks" / "im4.png")
    (tmp_path / "D" / "classes.yaml").write_text("names: [background, crack, wire]\nignore_index: 255\n")
    with pytest.warns(DatasetWarning, match=r"1 entry with an image suffix is not a readable file .*gone\.png"):
        build_dataset(f"folder:{tmp_path / 'D'}")
    assert main(["train-source", "--data", f"folder:{tmp_path / 'D'}", "--iters", "1", "--out",
                 str(tmp_path / "R"), "data.num_workers=0", "model.options={width: 4}"]) == 0
    err = capsys.readouterr().err
    assert "1 of 5 masks hold only the ignore value (they train nothing): im4" in err
    assert "labels of folder:" in err and "crack" in err


# ----------------------------------------------------------------------------------------------- imbalance tools


def test_class_weights_raise_a_rare_classes_share_of_the_loss():
    logits = torch.zeros(1, 2, 1, 4)
    target = torch.tensor([[[0, 0, 0, 1]]])
    plain = seg_cross_entropy(logits, target)
    weighted = seg_cross_entropy(logits, target, class_weight=torch.tensor([0.0, 4.0]))
    assert torch.allclose(plain, torch.tensor(np.log(2), dtype=torch.float32))
    assert torch.allclose(weighted, plain)  # (0 * 3 + 4 * 1) / 4 pixels: the mean over pixels keeps its scale
    w = inverse_frequency_weights(torch.tensor([90, 10, 0]))
    assert torch.allclose(w, torch.tensor([1 / (2 * 0.9), 1 / (2 * 0.1), 1.0]))
    assert torch.isclose((torch.tensor([0.9, 0.1]) * w[:2]).sum(), torch.tensor(1.0))
    lw = log_frequency_weights(torch.tensor([90, 10, 0]))  # ENet: 1 / ln(1.02 + f), pixel-weighted mean 1
    raw = 1 / np.log(1.02 + np.array([0.9, 0.1]))
    assert torch.allclose(lw[:2], torch.tensor(raw / (np.array([0.9, 0.1]) * raw).sum(), dtype=torch.float32))
    assert lw[2] == 1.0 and 1.0 < float(lw[1] / lw[0]) < float(w[1] / w[0])  # milder than 1 / f


def test_ohem_keeps_the_hardest_pixels_and_at_least_min_kept():
    # True-class probabilities 0.9, 0.6, 0.2 (as softmax of two logits).
    p = torch.tensor([0.9, 0.6, 0.2])
    logits = torch.stack([torch.log(p), torch.log(1 - p)], 0)[None, :, None, :]  # (1, 2, 1, 3)
    target = torch.zeros(1, 1, 3, dtype=torch.long)
    ce = -torch.log(p)
    assert torch.allclose(ohem_cross_entropy(logits, target, thresh=0.7, min_kept=1), ce[1:].mean())  # < 0.7
    assert torch.allclose(ohem_cross_entropy(logits, target, thresh=0.1, min_kept=1), ce[2:].mean())  # the hardest
    assert torch.allclose(ohem_cross_entropy(logits, target, thresh=0.1, min_kept=3), ce.mean())  # at least 3


@pytest.mark.parametrize("name", [m for m in MODELS if "aux_head" in model_options(m) and m != "deeplabv2_r101"])
def test_auxiliary_head_trains_with_its_weight_and_stays_out_of_inference(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, aux_head=True)
    task = SupervisedSegmentation(model, aux_weight=0.4)
    task.wrap_trainable(lambda n, m: m)
    batch = {"image": torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8),
             "mask": torch.randint(0, 3, (2, 64, 64), dtype=torch.uint8)}
    out = task.training_step(batch, 0)
    assert torch.allclose(out.loss, out.logs["loss_ce"] + 0.4 * out.logs["loss_aux"])
    out.loss.backward()
    assert model.aux_head[0].weight.grad is not None and model.aux_head[0].weight.grad.abs().sum() > 0
    model.eval()
    assert model(batch["image"].float() / 255).shape[1] == 3  # inference: the main head only


def test_train_source_with_every_imbalance_tool(tmp_path):
    write_folder(tmp_path / "D")
    out = tmp_path / "R"
    assert main(["train-source", "--data", f"folder:{tmp_path / 'D'}", "--iters", "2", "--out", str(out),
                 "data.num_workers=0", "model.options={width: 4}", "model.aux_head=true", "loss.class_weight=auto",
                 "loss.ohem=true", "loss.aux_weight=0.4"]) == 0
    weights = json.loads((out / "class_weights.json").read_text())["class_weight"]
    assert weights[0] < 1 < weights[1]  # the background weighs less than a thin class
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_aux" in r for r in records if "loss" in r)
    assert load_model(out / "model.ckpt")[0].aux_head is not None
    assert main(["train-source", "--model", "segformer_b0", "model.aux_head=true", "--out", str(tmp_path / "S")]) == 2
