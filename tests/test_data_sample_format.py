"""The sample format: mask encoding, member names, meta.json, shard names."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from vitlens.data.sample_format import (
    EncodedSample,
    SampleMeta,
    check_key,
    decode_mask,
    decode_mask_codes,
    decode_meta,
    encode_mask,
    encode_mask_codes,
    encode_png,
    is_imagenet_s_mask_png,
    shard_name,
    split_member_name,
)

META = SampleMeta(
    class_index=3, mask_class_id=4, class_name="dots_circle", wnid=None, folder_wnid=None,
    source="generator", split="validation", dataset="shapes",
)


def test_mask_encoding_is_imagenet_s_rgb() -> None:
    ids = np.array([[0, 1, 255], [256, 919, 1000]])
    png = encode_mask(ids)
    rgb = np.asarray(Image.open(io.BytesIO(png)))
    assert rgb.shape == (2, 3, 3)
    # 1000 = 232 + 256 * 3; 919 = 151 + 256 * 3; 256 = 0 + 256 * 1
    assert rgb[1, 2].tolist() == [232, 3, 0]
    assert rgb[1, 1].tolist() == [151, 3, 0]
    assert rgb[1, 0].tolist() == [0, 1, 0]
    assert is_imagenet_s_mask_png(png)
    decoded = decode_mask(png)
    assert decoded.dtype == np.int32
    np.testing.assert_array_equal(decoded, ids)


def test_mask_round_trip_full_range_and_errors() -> None:
    ids = np.random.default_rng(0).integers(0, 65536, (17, 23))
    np.testing.assert_array_equal(decode_mask(encode_mask(ids)), ids)
    with pytest.raises(ValueError, match="0..65535"):
        encode_mask(np.array([[70000]]))
    with pytest.raises(ValueError, match="2-D"):
        encode_mask(np.zeros((2, 2, 2), dtype=int))


def test_single_channel_masks_hold_ids_directly() -> None:
    grey = io.BytesIO()
    Image.fromarray(np.array([[0, 7], [1000, 3]], dtype=np.uint16)).save(grey, format="PNG")
    np.testing.assert_array_equal(decode_mask(grey.getvalue()), [[0, 7], [1000, 3]])
    assert not is_imagenet_s_mask_png(grey.getvalue())


def test_member_names_and_meta() -> None:
    sample = EncodedSample("shapes-validation-003-00001", "image.png", b"img", b"mask", META, b"codes")
    names = [name for name, _ in sample.members()]
    assert names == [
        "shapes-validation-003-00001.image.png",
        "shapes-validation-003-00001.mask.png",
        "shapes-validation-003-00001.mask.codes.png",
        "shapes-validation-003-00001.meta.json",
    ]
    meta = json.loads(sample.members()[3][1])
    assert meta == {
        "class_index": 3, "mask_class_id": 4, "class_name": "dots_circle", "wnid": None,
        "folder_wnid": None, "source": "generator", "split": "validation", "dataset": "shapes",
    }
    assert decode_meta(sample.members()[3][1]) == meta
    with pytest.raises(ValueError, match="lacks field"):
        decode_meta(b'{"class_index": 1}')
    assert split_member_name("n01440764_ILSVRC2012_val_1.image.jpg") == ("n01440764_ILSVRC2012_val_1", "image.jpg")
    assert split_member_name("dir/key.meta.json") == ("dir/key", "meta.json")


def test_keys_and_shard_names_are_checked() -> None:
    assert check_key("n01440764_ILSVRC2012_val_00000001") == "n01440764_ILSVRC2012_val_00000001"
    for bad in ("a.b", "a/b", "", "a b"):
        with pytest.raises(ValueError, match="invalid sample key"):
            check_key(bad)
    with pytest.raises(ValueError, match="image member"):
        EncodedSample("k", "image.gif", b"", b"", META).members()
    assert shard_name("imagenet_s919", "validation", 12) == "imagenet_s919-validation-000012.tar"
    with pytest.raises(ValueError, match="only contain"):
        shard_name("image-net", "validation", 0)


def test_png_is_lossless_and_deterministic() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    png = encode_png(pixels)
    assert png == encode_png(pixels)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), pixels)


def test_mask_codes_member_is_derived_from_the_ids() -> None:
    """mask.codes.png: per pixel 1 where the id is mask_class_id, 2 where it is 1000, 0
    elsewhere (other objects too); a palette PNG that decodes back exactly; written by default."""
    ids = np.random.default_rng(4).choice([0, 4, 9, 1000, 257], size=(23, 31))
    expected = np.array([[1 if v == 4 else 2 if v == 1000 else 0 for v in row] for row in ids.tolist()])
    sample = EncodedSample("k", "image.png", b"img", encode_mask(ids), META)  # mask_class_id 4
    members = dict(sample.members())
    with Image.open(io.BytesIO(members["k.mask.codes.png"])) as codes:
        assert codes.mode == "P" and codes.size == (31, 23)
        np.testing.assert_array_equal(np.asarray(codes), expected)
    np.testing.assert_array_equal(decode_mask_codes(members["k.mask.codes.png"]), expected)
    np.testing.assert_array_equal(decode_mask_codes(encode_mask_codes(expected)), expected)
    with pytest.raises(ValueError, match="0..2"):
        encode_mask_codes(np.full((2, 2), 3))
    grey = io.BytesIO()
    Image.fromarray(np.full((2, 2), 3, dtype=np.uint8)).save(grey, format="PNG")
    with pytest.raises(ValueError, match="0..2"):
        decode_mask_codes(grey.getvalue())
