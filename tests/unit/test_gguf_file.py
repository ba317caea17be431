"""GGUF checkpoints: the reader's layout, every quant type, and the files it refuses."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType
from gguf.quants import quantize

from diffusiond.backends.diffusers_backend import check_model_path
from diffusiond.backends.gguf_file import GgufFile
from diffusiond.backends.single_file import Checkpoint, detect_architecture
from diffusiond.errors import ModelLoadError
from tests.support.gguf_files import quantize_q4_k, sdcpp_type, tiny_gguf_file

Q = GGMLQuantizationType


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf_file(tmp_path_factory.mktemp("home"), "q8_0")[1]


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]]) -> Path:
    writer = GGUFWriter(str(path), arch="llama")
    for name, (data, kind) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _refusal(path: Path) -> str:
    with pytest.raises(ModelLoadError) as caught:
        Checkpoint(path)
    message = str(caught.value)
    assert str(path) in message
    return message


@pytest.mark.parametrize(
    ("kind", "tolerance"),
    [
        (Q.Q8_0, 0.01),
        (Q.Q5_0, 0.05),
        (Q.Q5_1, 0.05),
        (Q.Q4_0, 0.1),
        (Q.Q4_1, 0.1),
        (Q.Q4_K, 0.1),
    ],
)
def test_each_quant_type_reads_back_in_the_compute_dtype(
    tmp_path: Path, kind: GGMLQuantizationType, tolerance: float
) -> None:
    values = np.random.default_rng(1).standard_normal((3, 4, 512)).astype(np.float32)
    blocks = quantize_q4_k(values) if kind == Q.Q4_K else quantize(values, kind)
    gguf = GgufFile(_write(tmp_path / "one.gguf", {"w": (blocks, kind)}))
    assert gguf.tensors["w"].shape == (3, 4, 512)
    read = gguf.read(["w"], torch.bfloat16)["w"]
    assert read.dtype == torch.bfloat16
    error = (read.float() - torch.from_numpy(values)).abs().max().item()
    assert error < tolerance * float(np.abs(values).max()), (kind.name, error)


def test_plain_tensors_keep_their_shape_and_values(tmp_path: Path) -> None:
    conv = np.arange(2 * 3 * 5 * 7, dtype=np.float32).reshape(2, 3, 5, 7)
    steps = np.arange(6, dtype=np.int32).reshape(2, 3)
    gguf = GgufFile(
        _write(
            tmp_path / "plain.gguf", {"conv": (conv.astype(np.float16), Q.F16), "i": (steps, Q.I32)}
        )
    )
    read = gguf.read(["conv", "i"], torch.float32)
    assert torch.equal(read["conv"], torch.from_numpy(conv))
    assert torch.equal(read["i"], torch.from_numpy(steps))  # integers are not cast


def test_an_sdcpp_file_is_an_sd1_checkpoint_with_its_quantized_layers(q8_file: Path) -> None:
    checkpoint = Checkpoint(q8_file)
    assert detect_architecture(checkpoint).name == "sd1"
    check_model_path(q8_file)
    gguf = GgufFile(q8_file)
    kinds = {name: tensor.kind for name, tensor in gguf.tensors.items()}
    assert kinds["model.diffusion_model.middle_block.1.proj_in.weight"] in (Q.Q8_0, Q.F32)
    assert any(kind == Q.Q8_0 for kind in kinds.values())
    assert all(kinds[name] == Q.F32 for name in kinds if name.endswith(".bias"))
    assert kinds["model.diffusion_model.time_embed.0.weight"] == Q.F32
    assert sdcpp_type("x.time_embed.0.weight", Q.F32, Q.Q8_0) == Q.F32


def test_a_truncated_file_is_refused_before_reading_naming_the_tensor(
    tmp_path: Path, q8_file: Path
) -> None:
    cut = tmp_path / "cut.gguf"
    whole = q8_file.read_bytes()
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    message = _refusal(cut)
    assert "runs past the end of the file" in message
    assert "truncated" in message


def test_a_file_cut_inside_its_header_is_refused(tmp_path: Path, q8_file: Path) -> None:
    cut = tmp_path / "header.gguf"
    header_end = min(tensor.start for tensor in GgufFile(q8_file).tensors.values())
    cut.write_bytes(q8_file.read_bytes()[: header_end // 2])
    assert "header runs past the end" in _refusal(cut)


def test_a_file_without_the_magic_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "model.gguf"
    foreign.write_bytes(b"PK\x03\x04" + b"\x00" * 60)
    assert "GGUF magic" in _refusal(foreign)


def test_an_absurd_tensor_count_is_refused_before_allocating(tmp_path: Path) -> None:
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**60, 0))
    assert "more than the file can hold" in _refusal(huge)


def test_a_language_model_gguf_is_refused_naming_its_architecture(tmp_path: Path) -> None:
    rows = np.zeros((8, 32), dtype=np.float32)
    llm = _write(
        tmp_path / "llm.gguf",
        {
            "token_embd.weight": (rows, Q.F32),
            "blk.0.attn_q.weight": (quantize(rows, Q.Q8_0), Q.Q8_0),
        },
    )
    message = _refusal(llm)
    assert "'llama'" in message
    assert "model.diffusion_model." in message


def test_an_unsupported_quant_type_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    # Q8_1 is ggml's intermediate type for activations: 40 bytes a block, no dequantizer
    blocks = np.zeros((4, 40), dtype=np.uint8)
    path = _write(tmp_path / "q81.gguf", {"model.diffusion_model.x.weight": (blocks, Q.Q8_1)})
    message = _refusal(path)
    assert "model.diffusion_model.x.weight is stored as Q8_1" in message
    assert "Q4_K" in message  # the supported ones are listed


def test_an_unknown_type_number_is_refused(tmp_path: Path) -> None:
    name = b"model.diffusion_model.x.weight"
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 0)
    header += struct.pack("<Q", len(name)) + name + struct.pack("<IQIQ", 1, 32, 99, 0)
    path = tmp_path / "unknown.gguf"
    path.write_bytes(header + b"\x00" * 256)
    assert "unknown type number 99" in _refusal(path)
