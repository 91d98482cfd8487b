import pytest
import torch

import normonly.safe_io
from normonly.safe_io import read_json, read_tensors, write_files


def test_files_round_trip_with_a_digest(tmp_path):
    tensors = {"a.weight": torch.randn(3), "a.num_batches_tracked": torch.tensor(7), "b": torch.ones(2, 2).half()}
    write_files(tmp_path, json_files={"c.json": {"x": [1, 2]}}, tensor_files={"t.safetensors": tensors})
    back = read_tensors(tmp_path / "t.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert read_json(tmp_path / "c.json") == {"x": [1, 2]}


def test_files_get_the_permissions_of_an_ordinary_new_file(tmp_path):
    write_files(tmp_path, json_files={"c.json": {}}, tensor_files={"t.safetensors": {"w": torch.zeros(1)}})
    (tmp_path / "plain").write_text("")
    mode = (tmp_path / "plain").stat().st_mode
    assert (tmp_path / "c.json").stat().st_mode == mode == (tmp_path / "t.safetensors").stat().st_mode


def test_a_failure_in_any_file_replaces_none_of_them(tmp_path, monkeypatch):
    write_files(tmp_path, json_files={"c.json": {"v": 1}}, tensor_files={"t.safetensors": {"w": torch.zeros(2)}})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(normonly.safe_io, "save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        write_files(tmp_path, json_files={"c.json": {"v": 2}}, tensor_files={"t.safetensors": {"w": torch.ones(2)}})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_changed_tensor_bytes_fail_the_digest(tmp_path):
    write_files(tmp_path, tensor_files={"t.safetensors": {"w": torch.arange(16.0)}})
    path = tmp_path / "t.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        read_tensors(path)
