import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_adapters_example_trains_switches_and_matches_peft():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "adapters.py")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout
    assert "trainable params: 14,730 || all params: 11,181,642" in out
    for first, last in re.findall(r"loss ([\d.]+) -> ([\d.]+)", out):
        assert float(last) < float(first)
    preds = dict(re.findall(r"^(default|task_b|base|merged: ResNet) (\[.*\])$", out, re.M))
    assert preds["default"] == preds["merged: ResNet"]
    assert preds["default"] != preds["task_b"]
    assert "peft gives the same outputs: True" in out
