import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NORMONLY_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "scripts"))  # the benchmark scripts import their shared timer by name

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)


@pytest.fixture
def shared_data():
    path = SHARED / "data"
    if not path.exists():
        pytest.skip(f"shared data folder {path} is missing")
    return path
