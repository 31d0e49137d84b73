"""Every ``method.*`` key of every recipe is checked when the config loads: one bad value per key gives the usual
one-line error naming the key (exit 2), never a traceback; ``sfdaseg adapt --recipe R --help`` lists the keys."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from sfdaseg.cli import main
from sfdaseg.data.classes import CITYSCAPES19
from sfdaseg.methods import RECIPES
from sfdaseg.models import build_model, save_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "source.ckpt"
    save_model(path, build_model("tiny", num_classes=19, width=4), classes=CITYSCAPES19)
    return path


def _bad_values(f: dataclasses.Field, tp) -> list[str]:
    """Override values (YAML text) that ``f`` must refuse: out of its declared range, not a choice, wrong type."""
    meta, out = f.metadata, []
    for key, delta in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
        bound = meta.get(key)
        if bound is not None:
            value = bound + delta if key in ("ge", "le") else bound
            if key == "ge" and isinstance(bound, float) and 0 < bound < 1:
                value = bound / 2  # still below the bound
            out.append(f"[{value}, {value}]" if typing.get_origin(tp) in (tuple, list) or
                       _is_sequence(tp) else repr(value))
    if meta.get("choices") is not None:
        out.append("not_a_choice")
    if meta.get("nonempty"):
        out.append("[]")
    # A value of the wrong type for every field: a mapping where a number, string or list is expected, a string
    # where a mapping or a boolean is expected.
    base = typing.get_args(tp) or (tp,)
    out.append("'no'" if dict in base or bool in base or typing.get_origin(tp) is dict else "{a: 1}")
    return out


def _is_sequence(tp) -> bool:
    return any(typing.get_origin(a) in (tuple, list) for a in typing.get_args(tp))


CASES = []
for _name, _recipe in RECIPES.items():
    _hints = typing.get_type_hints(_recipe.config_cls)
    for _f in dataclasses.fields(_recipe.config_cls):
        for _v in _bad_values(_f, _hints[_f.name]):
            CASES.append(pytest.param(_name, _f.name, _v, id=f"{_name}.{_f.name}={_v}"))


def test_every_field_of_every_recipe_is_covered():
    covered = {(c.values[0], c.values[1]) for c in CASES}
    every = {(r, f.name) for r, rec in RECIPES.items() for f in dataclasses.fields(rec.config_cls)}
    assert covered == every and len(CASES) > 150


@pytest.mark.parametrize("recipe, key, value", CASES)
def test_a_bad_recipe_value_is_a_one_line_error(recipe, key, value, checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["adapt", "--recipe", recipe, "--checkpoint", str(checkpoint), "--out", str(out),
               f"method.{key}={value}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("sfdaseg adapt: error: ") and f"method.{key}" in err, err
    assert not out.exists()  # refused before any work: no run folder


def test_adapt_help_lists_the_recipes_keys(capsys):
    assert main(["adapt", "--recipe", "stvm", "--help"]) == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(RECIPES["stvm"].config_cls):
        assert f"method.{f.name}  " in text
    assert "method.alpha  float = 32.0; accepted: > 0; published." in text
    assert "method.metric_lr_mult  float = 10.0; accepted: > 0; ours." in text
    assert main(["adapt", "--recipe", "stvmm", "--help"]) == 2
    assert "unknown recipe 'stvmm'" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("sfdaseg ")
