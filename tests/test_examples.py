import re
import subprocess
import sys

from conftest import ROOT


def test_quickstart_runs_and_its_loss_falls():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, check=True
    ).stdout
    assert "trainable params: 14,730 || all params: 11,181,642" in out
    losses = [float(x) for x in re.findall(r"loss ([\d.]+)", out)]
    assert len(losses) == 5 and losses[-1] < losses[0]
