"""Run recipes/resnet_cifar.py in-process and save this rank's trainable parameters and γ/β (for the DDP test)."""

import importlib.util
import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

import normonly
from normonly.runs import end_process

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("resnet_cifar", ROOT / "recipes" / "resnet_cifar.py")
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)

if __name__ == "__main__":
    args = recipe.parse_args(sys.argv[1:])
    results, model = recipe.training_function(args)
    rank = PartialState().process_index
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    gamma_beta = set(normonly.norm_parameter_names(model))
    tensors |= {n: p.detach().contiguous() for n, p in model.named_parameters() if n in gamma_beta}
    save_file(tensors, str(Path(args.output) / f"rank{rank}.safetensors"))
    end_process()
