import pytest
import torch
import torchvision.transforms.v2 as T

from normonly import data
from normonly.data import CIFAR10_MEAN, CIFAR10_STD, augment, load_cifar10, normalize, resolve_cifar10


@pytest.fixture
def mini(shared_data):
    path = shared_data / "cifar10-mini"
    if not path.is_dir():
        pytest.skip(f"{path} is missing")
    return path


def test_resolve_prefers_flag_then_env_then_shared_copy_then_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("NORMONLY_CIFAR10", "/from/env")
    assert resolve_cifar10("/from/flag") == "/from/flag"
    assert resolve_cifar10() == "/from/env"
    monkeypatch.delenv("NORMONLY_CIFAR10")
    monkeypatch.setattr(data, "_SHARED_COPY", tmp_path)
    assert resolve_cifar10() == str(tmp_path)
    monkeypatch.setattr(data, "_SHARED_COPY", tmp_path / "absent")
    assert resolve_cifar10() == "uoft-cs/cifar10"


def test_mini_loads_as_uint8_nhwc_and_the_second_load_comes_from_the_cache(mini, tmp_path, monkeypatch):
    d = load_cifar10(mini, cache_dir=tmp_path, progress=False)
    assert d["x_train"].shape == (2000, 32, 32, 3) and d["x_test"].shape == (500, 32, 32, 3)
    assert d["x_train"].dtype == torch.uint8 and d["y_train"].dtype == torch.uint8
    assert set(d["y_train"].tolist()) == set(range(10))
    assert len(list(tmp_path.glob("cifar10-*.safetensors"))) == 1

    monkeypatch.setattr(data, "_decode", lambda *a: pytest.fail("decoded again instead of using the cache"))
    again = load_cifar10(mini, cache_dir=tmp_path, progress=False)
    assert all(torch.equal(d[k], again[k]) for k in d)


def test_a_changed_source_folder_is_decoded_again(mini, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(mini, copy)
    load_cifar10(copy, cache_dir=tmp_path / "cache", progress=False)
    (copy / "README.md").write_text("changed\n")
    load_cifar10(copy, cache_dir=tmp_path / "cache", progress=False)
    assert len(list((tmp_path / "cache").glob("cifar10-*.safetensors"))) == 2


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*--data"):
        load_cifar10(tmp_path / "nope", cache_dir=tmp_path)


def test_folder_without_cifar_data_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="could not load CIFAR-10"):
        load_cifar10(tmp_path / "empty", cache_dir=tmp_path)


def test_folder_with_wrong_columns_is_a_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "bad"
    (folder / "plain_text").mkdir(parents=True)
    for split in ("train", "test"):
        table = pa.table({"image": [b"x", b"y"], "target": [0, 1]})
        pq.write_table(table, folder / "plain_text" / f"{split}-00000-of-00001.parquet")
    with pytest.raises(ValueError, match="expected 'img'"):
        load_cifar10(folder, cache_dir=tmp_path)
    assert not list(tmp_path.glob("cifar10-*.safetensors"))


def test_augment_is_a_padded_crop_with_optional_flip_of_each_image():
    torch.manual_seed(0)
    x = torch.randint(1, 256, (64, 32, 32, 3), dtype=torch.uint8)  # no zeros: padding is recognizable
    out = augment(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (0, 0, 4, 4, 4, 4))
    flips = 0
    for i in range(len(x)):
        crops = {
            (dy, dx, f)
            for dy in range(9)
            for dx in range(9)
            for f in (False, True)
            if torch.equal(out[i], (lambda c: c.flip(1) if f else c)(padded[i, dy : dy + 32, dx : dx + 32]))
        }
        assert crops, f"image {i} is not a crop of its padded original"
        flips += all(f for _, _, f in crops)
    assert 16 <= flips <= 48  # about half flipped


def test_augment_is_reproducible_with_a_generator_and_random_without_one():
    x = torch.randint(0, 256, (32, 32, 32, 3), dtype=torch.uint8)
    a = augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(6)))


def test_normalize_matches_torchvision_to_tensor_and_normalize():
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    ref = T.Normalize(CIFAR10_MEAN, CIFAR10_STD)(x.permute(0, 3, 1, 2).float() / 255)
    out = normalize(x)
    assert out.shape == (4, 3, 32, 32) and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert normalize(x, channels_last=False).is_contiguous()
