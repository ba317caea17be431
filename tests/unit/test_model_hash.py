"""The model's short hash: AUTOMATIC1111's `Model hash`, computed once per file version."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from diffusiond.backends import model_hash
from diffusiond.backends.model_hash import short_model_hash


def test_a_file_hash_is_the_first_ten_hex_digits_of_its_sha256(tmp_path: Path) -> None:
    checkpoint = tmp_path / "m.safetensors"
    checkpoint.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]
    assert short_model_hash(checkpoint, tmp_path / "home") == expected


def test_a_folder_is_named_by_its_unet_weights(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(b"unet")
    assert short_model_hash(folder, tmp_path) == hashlib.sha256(b"unet").hexdigest()[:10]
    assert short_model_hash(tmp_path / "empty", tmp_path) is None


def test_the_hash_is_cached_until_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = tmp_path / "m.ckpt"
    checkpoint.write_bytes(b"first")
    home = tmp_path / "home"
    first = short_model_hash(checkpoint, home)
    computed: list[Path] = []
    real = model_hash.file_sha256

    def counting(path: Path) -> str:
        computed.append(path)
        return real(path)

    monkeypatch.setattr(model_hash, "file_sha256", counting)
    assert short_model_hash(checkpoint, home) == first
    assert computed == []  # from the cache in home
    checkpoint.write_bytes(b"second, longer")
    os.utime(checkpoint, ns=(1, 1))
    assert short_model_hash(checkpoint, home) == hashlib.sha256(b"second, longer").hexdigest()[:10]
    assert computed == [checkpoint]


def test_the_recipe_writes_the_hash_where_automatic1111_does() -> None:
    from diffusiond.backends.base import ImageSpec
    from diffusiond.engine.batch import image_recipe

    spec = ImageSpec("p", "", 64, 64, 3, 7.0, 9, "euler", model="alpha")
    with_hash = image_recipe(spec, "alpha", "sd1", model_hash="0123456789")
    assert "Size: 64x64, Model hash: 0123456789, Model: alpha, Version" in with_hash["parameters"]
    assert '"modelHash":"0123456789"' in with_hash["diffusiond"]
    without = image_recipe(spec, "alpha")
    assert "Model hash" not in without["parameters"]
    assert "modelHash" not in without["diffusiond"]
