"""The recipe-vs-plain-loop benchmark: both loops see the same inputs, and the recipe's loop is the faster one."""

import importlib.util
import sys

import pytest
import torch
from conftest import ROOT

SCRIPT = ROOT / "scripts" / "bench_recipe.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_recipe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_recipe"] = module
    spec.loader.exec_module(module)
    return module


def test_plain_loop_and_recipe_normalize_images_alike():
    bench = _bench()
    from normonly.data import normalize

    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    plain = torch.stack([x for x, _ in bench.CIFAR10Images(images, torch.zeros(4), bench.plain_transform(False))])
    torch.testing.assert_close(plain, normalize(images, channels_last=False), atol=1e-5, rtol=1e-5)


def test_plain_augmentation_keeps_shape_and_changes_images():
    bench = _bench()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    data = bench.CIFAR10Images(images, torch.zeros(16), bench.plain_transform(True))
    plain = bench.CIFAR10Images(images, torch.zeros(16), bench.plain_transform(False))
    out = [data[i][0] for i in range(16)]
    assert all(x.shape == (3, 32, 32) for x in out)
    assert any(not torch.equal(out[i], plain[i][0]) for i in range(16))


@pytest.mark.slow
def test_recipe_loop_is_faster_than_plain_loop_on_cifar_mini(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NORMONLY_CACHE", str(tmp_path / "cache"))
    bench = _bench()
    out = tmp_path / "recipe.json"
    report = bench.main(
        ["--data", str(shared_data / "cifar10-mini"), "--depths", "14", "--steps", "3", "--repeats", "3",
         "--warmup", "1", "--accuracy-steps", "2", "--output", str(out)]
    )  # fmt: skip
    rows = report["results"]["resnet14"]
    assert set(rows) == {"plain", "recipe"}
    assert all(r["images_per_second"] > 0 and 0 <= r["test_accuracy"] <= 1 for r in rows.values())
    # CPU time: tests run beside each other (pytest -n) and wall-clock rounds this short swing with the load
    speedup = rows["recipe"]["cpu_ratio_to_plain"]
    assert speedup > 1.0, f"recipe loop needs {1 / speedup:.2f} x the plain loop's CPU time per step"
    assert out.exists() and "| resnet14 | recipe |" in out.with_suffix(".md").read_text()
