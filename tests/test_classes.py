"""Class tables against the official cityscapesscripts label table, and the ClassSpec helpers."""

from __future__ import annotations

import numpy as np
import pytest

from sfdaseg.data.classes import (
    CITYSCAPES19,
    CITYSCAPES_NAMES,
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
    LABELID_TO_TRAINID,
    PROTOCOLS,
    SYNTHIA_TO_TRAINID,
    TRAINID_TO_LABELID,
    ClassSpec,
    colorize,
    default_palette,
    make_lut,
)

labels_mod = pytest.importorskip("cityscapesscripts.helpers.labels")


def test_labelid_to_trainid_matches_cityscapesscripts():
    official = {lb.id: lb.trainId for lb in labels_mod.labels}
    for lb in labels_mod.labels:
        if 0 <= lb.trainId <= 18:
            assert LABELID_TO_TRAINID.get(lb.id) == lb.trainId, lb.name
    for raw in range(256):
        if raw not in LABELID_TO_TRAINID and raw in official:
            assert official[raw] in (255, -1), raw
    assert set(LABELID_TO_TRAINID) <= set(official)
    assert sorted(LABELID_TO_TRAINID.values()) == list(range(19))


def test_palette_and_names_match_cityscapesscripts():
    by_train = {lb.trainId: lb for lb in labels_mod.labels if 0 <= lb.trainId <= 18}
    assert len(by_train) == 19
    for t in range(19):
        assert CITYSCAPES_PALETTE[t] == tuple(by_train[t].color), t
        assert CITYSCAPES_NAMES[t] == by_train[t].name
    assert CITYSCAPES19.colors == CITYSCAPES_PALETTE and CITYSCAPES19.num_classes == 19


def test_protocols_and_synthia_map():
    assert {k: len(v) for k, v in PROTOCOLS.items()} == {19: 19, 16: 16, 13: 13}
    assert set(PROTOCOLS[13]) < set(PROTOCOLS[16]) < set(PROTOCOLS[19])
    assert set(PROTOCOLS[16]) == set(range(19)) - {9, 14, 16}
    assert set(PROTOCOLS[13]) == set(PROTOCOLS[16]) - {3, 4, 5}
    assert sorted(SYNTHIA_TO_TRAINID.values()) == list(PROTOCOLS[16])  # SYNTHIA covers exactly the 16
    assert all(LABELID_TO_TRAINID[TRAINID_TO_LABELID[t]] == t for t in range(19))


def test_make_lut():
    lut = make_lut(LABELID_TO_TRAINID)
    assert lut.shape == (256,) and lut.dtype == np.uint8
    raw = np.array([[7, 26, 0], [33, 255, 3]], dtype=np.uint8)
    np.testing.assert_array_equal(lut[raw], [[0, 13, 255], [18, 255, 255]])
    big = make_lut(SYNTHIA_TO_TRAINID, size=65536)
    assert big.shape == (65536,) and big[3] == 0 and big[300] == IGNORE_INDEX
    with pytest.raises(ValueError, match="300"):
        make_lut({300: 1})


def test_colorize():
    mask = np.array([[0, 13], [255, 18]], dtype=np.uint8)
    rgb = colorize(mask, CITYSCAPES19.colors, ignore_color=(1, 2, 3))
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [128, 64, 128] and rgb[0, 1].tolist() == [0, 0, 142]
    assert rgb[1, 0].tolist() == [1, 2, 3] and rgb[1, 1].tolist() == [119, 11, 32]


def test_classspec_validation_and_roundtrip():
    spec = ClassSpec(names=("a", "b"), palette=((1, 2, 3), (4, 5, 6)))
    assert spec.num_classes == 2 and ClassSpec.from_dict(spec.to_dict()) == spec
    no_palette = ClassSpec(names=("a", "b", "c"))
    assert no_palette.colors == default_palette(3) and len(set(no_palette.colors)) == 3
    with pytest.raises(ValueError, match="unique"):
        ClassSpec(names=("a", "a"))
    with pytest.raises(ValueError, match="palette"):
        ClassSpec(names=("a", "b"), palette=((1, 2, 3),))
    with pytest.raises(ValueError, match="ignore_index"):
        ClassSpec(names=("a", "b"), ignore_index=1)
