"""Two DDP processes: switching to an adapter that trains another module after DDP was built must raise; switching
before building DDP must train in lockstep. Each rank writes what happened to OUT/rank<r>.json."""

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from normonly import NormOnlyConfig, get_normonly_model
from normonly.runs import end_process

if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    model = get_normonly_model(base, NormOnlyConfig(), "a")
    model.add_adapter("b", NormOnlyConfig(modules_to_save=["2"]))  # b also trains the head, a does not
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(rank))  # each rank its own data

    ddp = DDP(model)
    ddp(x).square().mean().backward()
    report = {}
    try:
        model.set_adapter("b")
        report["switch_after_ddp"] = "allowed"
    except RuntimeError as err:
        report["switch_after_ddp"] = str(err)

    model.zero_grad()
    del ddp  # the right way: drop the old DDP, switch, then build DDP anew around the model
    gc.collect()
    try:
        model.set_adapter("b")
        ddp_b = DDP(model)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(3):
            ddp_b(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        report["head_after_rebuild"] = base[2].weight.detach().flatten().tolist()
    except RuntimeError as err:
        report["head_after_rebuild"] = str(err)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    end_process()  # see its docstring: a gloo rank can abort in the interpreter's shutdown
