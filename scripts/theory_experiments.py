"""Measure the claims and open questions of Giannou, Rajput & Papailiopoulos (COLT 2023) with normonly.theory.

    python scripts/theory_experiments.py --quick                     # every experiment, small (~2 min)
    python scripts/theory_experiments.py                             # the full version (~30 min, one core)
    python scripts/theory_experiments.py --only timing exactness     # a subset
    nohup /work/bin/cpu-slot python scripts/theory_experiments.py > results/theory/log.txt 2>&1 &

Each experiment writes results/theory/<name>.json (its settings and every measured row) and
<name>.png. Errors are max |net(x) − target(x)| / max |target(x)| over box inputs, half of them
corners of the box ‖x‖∞ ≤ 1 (theory.box_inputs). Targets are torch-default-initialized MLPs of
width d and depth l with a ReLU after every layer but the last.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import matplotlib
import torch
from torch import nn
from tqdm import tqdm

from normonly import theory
from normonly.theory.draws import draw_pair
from normonly.theory.target import interval

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

F64 = torch.float64


def mlp(d: int, depth: int, seed: int) -> nn.Sequential:
    torch.manual_seed(10_000 + seed)
    mods = []
    for i in range(depth):
        mods += [nn.Linear(d, d)] + ([nn.ReLU()] if i < depth - 1 else [])
    return nn.Sequential(*mods).double()


def lowrank_mlp(d: int, depth: int, rank: int, seed: int) -> nn.Sequential:
    """An MLP whose weight matrices have rank ``rank`` (products of d×rank and rank×d Gaussians)."""
    target = mlp(d, depth, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in target:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(d, rank, generator=g, dtype=F64) @ torch.randn(rank, d, generator=g, dtype=F64)
                               / d)
    return target


def error(net, target, d, n, seed=0):
    return theory.max_relative_error(net, target, theory.box_inputs(d, n, seed=seed))


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def pair_net(d_in: int, d_out: int, width: int, seed: int, relu: bool = False) -> nn.Sequential:
    """One frozen gaussian pair of any width (random_network always uses the theorem's width)."""
    W_a, W_b = draw_pair(d_in, d_out, width, init="gaussian", g=torch.Generator().manual_seed(seed))
    net = nn.Sequential(nn.Linear(d_in, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
                        nn.Linear(width, d_out, bias=False), nn.BatchNorm1d(d_out), *([nn.ReLU()] if relu else []))
    net = net.double().eval()
    with torch.no_grad():
        net[0].weight.copy_(W_a)
        net[3].weight.copy_(W_b)
    net[0].weight.requires_grad_(False)
    net[3].weight.requires_grad_(False)
    return net


def train_norm(net, target, d, steps, opt_name, lr, seed, n_eval, checkpoints=12):
    """Train only the BatchNorm γ/β (eval-mode BN, i.e. the construction's function class) from the
    default γ=1, β=0, MSE normalized by the target's mean square: Adam / SGD (momentum 0.9) on fresh
    uniform box samples (batch 256, cosine schedule), or full-batch L-BFGS on 4,096 fixed samples."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    params = [p for p in net.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    if opt_name == "lbfgs":
        opt = torch.optim.LBFGS(params, lr=lr, max_iter=1, history_size=50, line_search_fn="strong_wolfe")
        x_fixed = torch.rand(4096, d, generator=g, dtype=F64) * 2 - 1
    elif opt_name == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    sched = None if opt_name == "lbfgs" else torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    marks = sorted({max(1, round(steps ** (i / (checkpoints - 1)))) for i in range(checkpoints)})
    x_eval = theory.box_inputs(d, n_eval, seed=seed + 1)
    with torch.no_grad():
        y_eval = target(x_eval)
    curve, start, clock = [], time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        x = x_fixed if opt_name == "lbfgs" else torch.rand(256, d, generator=g, dtype=F64) * 2 - 1
        with torch.no_grad():
            y = target(x)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = ((net(x) - y) ** 2).mean() / (y**2).mean()
            loss.backward()
            return loss

        loss = opt.step(closure)
        if sched is not None:
            sched.step()
        if step in marks:
            clock += time.perf_counter() - start
            with torch.no_grad():
                rms = float(((net(x_eval) - y_eval) ** 2).mean().sqrt() / (y_eval**2).mean().sqrt())
            curve.append({"step": step, "seconds": clock, "max_rel_error": theory.max_relative_error(net, target, x_eval),
                          "rms_rel_error": rms, "loss": float(loss.detach())})
            start = time.perf_counter()
    return curve


# ---------------------------------------------------------------------------------------------- experiments


def exp_exactness(args):
    """Relative error vs width d and depth l, float64 and float32 ("wide", gaussian draws)."""
    ds = [2, 4, 8, 16] if args.quick else [2, 4, 8, 16, 32]
    ls = [1, 2, 3, 4] if args.quick else [1, 2, 3, 4, 5, 6]
    seeds = range(1 if args.quick else 3)
    rows = []
    for d, depth, dtype in tqdm([(d, depth, t) for d in ds for depth in ls for t in ("float64", "float32")], desc="exactness"):
        errs = []
        for s in seeds:
            target = mlp(d, depth, s)
            net = theory.reconstruct(target, seed=s, dtype=getattr(torch, dtype))
            errs.append(error(net, target, d, args.n, seed=s))
        rows.append({"d": d, "l": depth, "dtype": dtype, "max_rel_error": max(errs), "errors": errs})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, dtype in zip(axes, ("float64", "float32")):
        for d in ds:
            pts = [r for r in rows if r["d"] == d and r["dtype"] == dtype]
            ax.semilogy([r["l"] for r in pts], [r["max_rel_error"] for r in pts], "o-", label=f"d={d} (width {d * d})")
        ax.axhline(1e-10 if dtype == "float64" else 1e-3, color="gray", ls=":")
        ax.set(title=f"wide construction, {dtype}", xlabel="target depth l (random net depth 2l)")
    axes[0].set_ylabel(f"max relative error ({len(seeds)} seeds, {args.n} box inputs)")
    axes[0].legend()
    return {"ds": ds, "ls": ls, "seeds": len(seeds)}, rows, fig


def exp_methods(args):
    """Every method at d <= 16, l <= 3, float64: the acceptance thresholds (wide/skip 1e-10, sparse/lowrank 1e-8)."""
    ds, ls = [4, 8, 16], [1, 2, 3]
    seeds = range(2 if args.quick else 5)
    methods = [("wide", {}), ("skip", {"k": 2}), ("skip", {"k": 4}), ("sparse", {}), ("lowrank", {}),
               ("wide", {"init": "orthobasis"})]
    rows = []
    for (method, opts), d, depth in tqdm([(m, d, depth) for m in methods for d in ds for depth in ls], desc="methods"):
        errs, secs, info = [], [], None
        for s in seeds:
            # lowrank gets targets of rank d/4, so its width r·d is a quarter of wide's d²
            target = lowrank_mlp(d, depth, d // 4, s) if method == "lowrank" else mlp(d, depth, s)
            net, sec = timed(theory.reconstruct, target, method=method, seed=s, **opts)
            errs.append(error(net, target, d, args.n, seed=s))
            secs.append(sec)
            info = net.theory_info
        name = method + "".join(f" {k}={v}" for k, v in opts.items()) + (" (rank-d/4 targets)" if method == "lowrank" else "")
        rows.append({"method": name, "d": d, "l": depth, "max_rel_error": max(errs), "width": info["width"],
                     "depth": info["depth"], "frozen_nonzero": info["frozen_nonzero"],
                     "seconds": statistics.median(secs)})
    fig, ax = plt.subplots(figsize=(10, 4))
    names = list(dict.fromkeys(r["method"] for r in rows))
    for i, name in enumerate(names):
        pts = [r for r in rows if r["method"] == name]
        ax.semilogy([j + i / (len(names) + 1) for j in range(len(pts))], [r["max_rel_error"] for r in pts], "o",
                    label=name)
    ax.set_xticks(range(len(ds) * len(ls)), [f"d={d}\nl={depth}" for d in ds for depth in ls])
    ax.axhline(1e-10, color="gray", ls=":")
    ax.axhline(1e-8, color="gray", ls="--")
    ax.set(ylabel=f"max relative error ({len(seeds)} seeds)", title="every method, float64")
    ax.legend(fontsize=8, ncol=3)
    return {"ds": ds, "ls": ls, "seeds": len(seeds)}, rows, fig


@torch.no_grad()
def _diagnose(net, target, d):
    """Per target layer: condition number of each Khatri-Rao system, and how loose the interval box is."""
    conds = []
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    for a, b in zip(linears[0::2], linears[1::2]):
        s = torch.linalg.svdvals(theory.pair_system(a.weight.double(), b.weight.double()))
        conds.append(float(s[0] / s[-1]))
    x = theory.box_inputs(d, 2000)
    lo = -torch.ones(d, dtype=F64)
    hi = torch.ones(d, dtype=F64)
    looseness, h = [], x
    for m in target:
        if isinstance(m, nn.Linear):
            lo, hi = interval(m.weight.double(), m.bias.double(), lo, hi)
            h = m(h)
            looseness.append(float((hi - lo).max() / (h.max(0).values - h.min(0).values).max()))
        else:
            lo, hi, h = lo.clamp(min=0), hi.clamp(min=0), m(h)
    return conds, looseness


def exp_conditioning(args):
    """Error growth with depth, its causes, and remedies (draws, bounds, redraws, scale)."""
    d = 8 if args.quick else 16
    ls = [1, 2, 3, 4] if args.quick else [1, 2, 3, 4, 5, 6]
    seeds = range(2 if args.quick else 4)
    variants = {
        "gaussian, interval β (default)": {},
        "gaussian, ‖·‖∞ β (bounds='norm')": {"bounds": "norm"},
        "gaussian, redraw if cond > 1e4": {"max_cond": 1e4},
        "gaussian ×100 (scaled draw)": {"scale": 100.0},
        "orthogonal": {"init": "orthogonal"},
        "orthobasis (cond = 1)": {"init": "orthobasis"},
    }
    rows = []
    for (name, opts), depth, dtype in tqdm([(v, depth, t) for v in variants.items() for depth in ls
                                        for t in ("float64", "float32")], desc="conditioning"):
        errs, conds, loose = [], [], []
        for s in seeds:
            target = mlp(d, depth, s)
            opts = dict(opts)
            scale = opts.pop("scale", None)
            if scale is None:
                net = theory.reconstruct(target, seed=s, dtype=getattr(torch, dtype), **opts)
            else:
                net = theory.random_network([d] * (depth + 1), seed=s, dtype=getattr(torch, dtype))
                with torch.no_grad():
                    for m in net.modules():
                        if isinstance(m, nn.Linear):
                            m.weight.mul_(scale)
                theory.fit(net, target)
            errs.append(error(net, target, d, args.n, seed=s))
            if dtype == "float64":
                c, lz = _diagnose(net, target, d)
                conds.append(max(c))
                loose.append(lz[-1])
        rows.append({"variant": name, "d": d, "l": depth, "dtype": dtype, "max_rel_error": max(errs),
                     "median_rel_error": statistics.median(errs),
                     **({"max_cond": max(conds), "box_looseness_last_layer": statistics.median(loose)} if conds else {})})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, dtype in zip(axes[:2], ("float64", "float32")):
        for name in variants:
            pts = [r for r in rows if r["variant"] == name and r["dtype"] == dtype]
            ax.semilogy([r["l"] for r in pts], [r["max_rel_error"] for r in pts], "o-", label=name)
        ax.set(title=f"d={d}, {dtype}", xlabel="target depth l", ylabel="max relative error")
    axes[0].legend(fontsize=7)
    pts = [r for r in rows if r["variant"].startswith("gaussian, interval") and r["dtype"] == "float64"]
    axes[2].semilogy([r["l"] for r in pts], [r["box_looseness_last_layer"] for r in pts], "s-",
                     label="interval box width / true range (last layer)")
    axes[2].semilogy([r["l"] for r in pts], [r["max_cond"] for r in pts], "^-", label="max cond of the KR systems")
    axes[2].set(title="why: looser boxes → larger β → cancellation", xlabel="target depth l")
    axes[2].legend(fontsize=7)
    return {"d": d, "ls": ls, "seeds": len(seeds)}, rows, fig


def exp_sgd(args):
    """The construction vs Adam/SGD/L-BFGS training the same γ/β of the same random network."""
    d, depth = (4, 2) if args.quick else (8, 2)
    steps = 300 if args.quick else 10_000
    target = mlp(d, depth, 0)
    sizes = [d] * (depth + 1)
    net = theory.random_network(sizes, seed=0)
    _, sec = timed(theory.fit, net, target)  # the γ/β computation, as the training time below
    construction = {"seconds": sec, "max_rel_error": error(net, target, d, args.n)}
    runs = []
    configs = [(o, lr, steps) for o in ("adam", "sgd") for lr in (1e-3, 1e-2, 1e-1)]
    configs.append(("lbfgs", 1.0, steps // 10))
    for opt_name, lr, n_steps in tqdm(configs, desc="sgd vs construction"):
        curve = train_norm(theory.random_network(sizes, seed=0), target, d, n_steps, opt_name, lr, seed=1, n_eval=args.n)
        runs.append({"optimizer": opt_name, "lr": lr, "steps": n_steps, "curve": curve, "final": curve[-1]})
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in runs:
        c = r["curve"]
        ax.loglog([p["seconds"] for p in c], [p["max_rel_error"] for p in c], ".-", label=f"{r['optimizer']} lr={r['lr']}")
    ax.loglog([construction["seconds"]], [construction["max_rel_error"]], "k*", ms=14, label="construction (fit)")
    ax.set(xlabel="wall-clock seconds", ylabel="max relative error", title=f"d={d}, l={depth}, width {d * d}: γ/β only")
    ax.legend(fontsize=8)
    return {"d": d, "l": depth, "steps": steps, "construction": construction}, runs, fig


def exp_width(args):
    """Width below d²: least-squares residual vs width ratio, and Adam on the same widths."""
    d = 6 if args.quick else 8
    steps = 300 if args.quick else 4000
    ratios = [0.125, 0.25, 0.5, 0.75, 0.875, 1.0, 1.25, 2.0]
    target = mlp(d, 1, 0)
    rows = []
    for ratio in tqdm(ratios, desc="width"):
        m = max(1, round(ratio * d * d))
        net = pair_net(d, d, m, seed=0)
        res = theory.fit(net, target).residual
        fit_err = error(net, target, d, args.n)
        best = min(train_norm(pair_net(d, d, m, seed=0), target, d, steps, "adam", lr, 1, args.n)[-1]["max_rel_error"]
                    for lr in (1e-3, 1e-2))
        rows.append({"width": m, "ratio": m / (d * d), "lstsq_residual": res,
                     "predicted_residual": math.sqrt(max(0.0, 1 - m / (d * d))),
                     "fit_max_rel_error": fit_err, "adam_max_rel_error": best})
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    x = [r["ratio"] for r in rows]
    ax.semilogy(x, [max(r["lstsq_residual"], 1e-16) for r in rows], "o-", label="least-squares residual ‖F̂−F‖/‖F‖")
    ax.semilogy(x, [max(r["predicted_residual"], 1e-16) for r in rows], "k:", label="√(1 − width/d²) (random subspace)")
    ax.semilogy(x, [r["fit_max_rel_error"] for r in rows], "s-", label="fit: max rel. function error")
    ax.semilogy(x, [r["adam_max_rel_error"] for r in rows], "^-", label=f"Adam {steps} steps: max rel. error")
    ax.axvline(1.0, color="gray", ls="--")
    ax.set(xlabel="width / d²", ylabel="relative error", title=f"one target layer d={d}: how much width is needed")
    ax.legend(fontsize=8)
    return {"d": d, "steps": steps}, rows, fig


def exp_sparsity(args):
    """Sparse draws: singular fraction vs d and p, success without and with seed-only redraws, error vs cond."""
    ds = [6, 8] if args.quick else [6, 7, 8, 9, 10, 12, 16]
    draws = 40 if args.quick else 200
    redraw_seeds = 10 if args.quick else 20
    rows, scatter = [], []
    for d in ds:
        p_star, p_log = math.sqrt(math.log(d) / d), math.log(d) / d
        ps = sorted({min(1.0, round(v, 4)) for v in (p_log, 2 * p_log, 0.5 * p_star, 0.75 * p_star, p_star,
                                                     1.25 * p_star, 1.5 * p_star, 2 * p_star)})
        for p in tqdm(ps, desc=f"sparsity d={d}"):
            singular = ill = ok = 0
            conds, errs = [], []
            for s in range(draws):
                W_a, W_b = draw_pair(d, d, d * d, init="gaussian", g=torch.Generator().manual_seed(s), p=p)
                sv = torch.linalg.svdvals(theory.pair_system(W_a, W_b))
                cond = float(sv[0] / sv[-1]) if sv[-1] > 0 else float("inf")
                singular += bool(sv[-1] <= sv[0] * d * d * torch.finfo(F64).eps)
                ill += cond > 1e8
                conds.append(cond)
                target = mlp(d, 1, s)
                net = pair_net(d, d, d * d, seed=0)
                with torch.no_grad():
                    net[0].weight.copy_(W_a)
                    net[3].weight.copy_(W_b)
                try:
                    theory.fit(net, target)
                    e = error(net, target, d, 1000, seed=s)
                except RuntimeError:  # non-finite γ/β from an exactly singular system
                    e = float("inf")
                ok += e <= 1e-8
                errs.append(e)
                if d in (8, 16) and s < 60:
                    scatter.append({"d": d, "p": p, "cond": min(cond, 1e300), "error": min(e, 1e300)})
            redraws, redraw_errs, failures = [], [], 0
            for s in range(redraw_seeds):
                target = mlp(d, 1, s)
                try:
                    net = theory.reconstruct(target, method="sparse", p=p, seed=s, max_redraws=100)
                except RuntimeError:
                    failures += 1
                    continue
                redraws.append(net.theory_info["redraws"][0])
                redraw_errs.append(error(net, target, d, 1000, seed=s))
            rows.append({
                "d": d, "p": p, "p_over_sqrt_logd_d": p / p_star, "p_over_logd_d": p / p_log, "draws": draws,
                "singular_fraction": singular / draws, "cond_over_1e8_fraction": ill / draws,
                # a unit whose W_a row or W_b column is all zero drops a rank-one term: d² − 1 terms cannot span d²
                "dead_unit_probability": 1 - (1 - (1 - p) ** d) ** (2 * d * d),
                "median_cond": statistics.median(conds), "success_without_redraw": ok / draws,
                "median_error_without_redraw": statistics.median(errs),
                "redraw_seeds": redraw_seeds, "redraw_success": len(redraws) / redraw_seeds,
                "mean_redraws": statistics.mean(redraws) if redraws else None,
                "max_error_with_redraws": max(redraw_errs) if redraw_errs else None,
                "nonzero_per_target_weight": 2 * p * d,
            })
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.4))
    axes = axes.ravel()
    for d in ds:
        pts = [r for r in rows if r["d"] == d]
        x = [r["p_over_sqrt_logd_d"] for r in pts]
        line, = axes[0].plot(x, [r["singular_fraction"] for r in pts], "o-", label=f"d={d}")
        axes[0].plot(x, [r["dead_unit_probability"] for r in pts], ":", color=line.get_color())
        axes[1].plot(x, [r["success_without_redraw"] for r in pts], "o-", label=f"d={d}")
        axes[2].semilogy(x, [(r["mean_redraws"] or 0) + 1 if r["redraw_success"] > 0 else float("nan") for r in pts],
                         "o-", label=f"d={d}")
    for ax, title in zip(axes[:3], ("singular fraction (dotted: P(some unit is dead))", "exact (≤1e-8) without redraw",
                                    "mean draws needed with seed-only redraws (≤101)")):
        ax.axvline(1.0, color="gray", ls="--")
        ax.set(xlabel="p / √(log d / d)   (dashed: p = √(log d / d))", title=title)
        ax.legend(fontsize=7)
    for mult, marker in ((0.75, "v-"), (1.0, "o-"), (1.25, "s-"), (1.5, "^-")):
        pts = [min((r for r in rows if r["d"] == d), key=lambda r: abs(r["p_over_sqrt_logd_d"] - mult)) for d in ds]
        axes[3].plot(ds, [r["singular_fraction"] for r in pts], marker, label=f"p = {mult}·√(log d / d)")
    pts = [min((r for r in rows if r["d"] == d), key=lambda r: abs(r["p_over_logd_d"] - 1)) for d in ds]
    axes[3].plot(ds, [r["singular_fraction"] for r in pts], "k:", label="p = log d / d")
    axes[3].set(xlabel="d", ylabel="singular fraction", title=f"singular fraction vs d ({draws} draws each)")
    axes[3].legend(fontsize=7)
    for d, color in ((8, "C0"), (16, "C1")):
        pts = [c for c in scatter if c["d"] == d]
        axes[4].loglog([c["cond"] for c in pts], [max(c["error"], 1e-17) for c in pts], ".", color=color, alpha=0.5,
                       label=f"d={d}, all p")
    grid = [10.0 ** k for k in range(0, 21)]
    axes[4].loglog(grid, [g * 1e-16 for g in grid], "k--", label="cond · 1e-16")
    axes[4].set(xlim=(1, 1e20), ylim=(1e-17, 10), xlabel="condition number of the KR system",
                ylabel="max rel. error (no redraw)", title="error ≤ cond × float64 ε; singular draws fail")
    axes[4].legend(fontsize=7)
    for d in ds:
        pts = [r for r in rows if r["d"] == d]
        axes[5].semilogy([r["p_over_sqrt_logd_d"] for r in pts], [min(r["median_cond"], 1e300) for r in pts], "o-", label=f"d={d}")
    axes[5].axvline(1.0, color="gray", ls="--")
    axes[5].set(xlabel="p / √(log d / d)", title="median condition number", ylim=(1, 1e20))
    axes[5].legend(fontsize=7)
    return {"ds": ds, "draws": draws, "redraw_seeds": redraw_seeds, "max_redraws": 100}, {"rows": rows, "cond_vs_error": scatter}, fig


def exp_skip(args):
    """Skip connections: width d²/k and depth 2kl over k, exactness and size."""
    d, depth = (8, 2) if args.quick else (16, 2)
    ks = [k for k in range(1, d + 1) if d % k == 0]
    rows = []
    for k in tqdm(ks, desc="skip"):
        target = mlp(d, depth, 0)
        net, sec = timed(theory.reconstruct, target, method="skip", k=k)
        info = net.theory_info
        rows.append({"k": k, "width": info["width"], "depth": info["depth"], "frozen_params": info["frozen_params"],
                     "trainable_params": info["trainable_params"], "seconds": sec,
                     "max_rel_error": error(net, target, d, args.n)})
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.loglog(ks, [r["width"] for r in rows], "o-", label="width (d²/k)")
    ax.loglog(ks, [r["depth"] for r in rows], "s-", label="depth in layers (2kl)")
    ax2 = ax.twinx()
    ax2.semilogy(ks, [r["max_rel_error"] for r in rows], "r^--", label="max rel. error (right)")
    ax2.set_ylim(1e-16, 1e-8)
    ax.set(xlabel="k (blocks per target layer)", title=f"skip construction, d={d}, l={depth}")
    ax.legend(loc="upper center", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    return {"d": d, "l": depth}, rows, fig


def exp_timing(args):
    """reconstruct wall time, and the Khatri-Rao solve vs float64 LU and dense lstsq, side by side."""
    ds = [d for d in (8, 16, 32, 64, 128) if d <= (32 if args.quick else args.max_d)]
    reps = 3
    rows = []
    for d in tqdm(ds, desc="timing"):
        W_a, W_b = draw_pair(d, d, d * d, init="gaussian", g=torch.Generator().manual_seed(0))
        F = mlp(d, 1, 0)[0].weight.detach()
        K = theory.pair_system(W_a, W_b)
        ours = min(timed(theory.solve_pair, W_a, W_b, F)[1] for _ in range(reps))
        lu = min(timed(torch.linalg.solve, K, F.reshape(-1))[1] for _ in range(reps))
        lstsq = timed(torch.linalg.lstsq, K, F.reshape(-1, 1))[1]
        row = {"d": d, "system": d * d, "solve_pair_s": ours, "float64_lu_s": lu, "dense_lstsq_gelsy_s": lstsq,
               "speedup_vs_lu": lu / ours, "speedup_vs_lstsq": lstsq / ours if lstsq else None}
        for depth in (1, 2):
            for init in ("gaussian", "orthobasis"):
                target = mlp(d, depth, 0)
                secs = [timed(theory.reconstruct, target, init=init)[1] for _ in range(reps)]
                row[f"reconstruct_l{depth}_{init}_s"] = statistics.median(secs)
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    x = [r["system"] for r in rows]
    for key, label in [("reconstruct_l1_gaussian_s", "reconstruct, l=1, gaussian"),
                       ("reconstruct_l2_gaussian_s", "reconstruct, l=2, gaussian"),
                       ("reconstruct_l1_orthobasis_s", "reconstruct, l=1, orthobasis"),
                       ("solve_pair_s", "one KR solve (mixed-precision LU)"), ("float64_lu_s", "one float64 LU solve"),
                       ("dense_lstsq_gelsy_s", "one dense lstsq (gelsy)")]:
        ax.loglog(x, [r[key] for r in rows], "o-" if "reconstruct" in key else "s--", label=label)
    ax.axhline(0.1, color="gray", ls=":")
    ax.axhline(3.0, color="gray", ls=":")
    ax.set(xlabel="Khatri-Rao system size d² (= width)", ylabel="seconds (1 CPU thread)",
           title="time to reconstruct a width-d target")
    ax.legend(fontsize=8)
    return {"ds": ds, "threads": torch.get_num_threads(), "reps": reps}, rows, fig


EXPERIMENTS = {
    "timing": exp_timing,
    "exactness": exp_exactness,
    "methods": exp_methods,
    "conditioning": exp_conditioning,
    "skip": exp_skip,
    "width": exp_width,
    "sparsity": exp_sparsity,
    "sgd": exp_sgd,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, few seeds and steps (about 2 minutes)")
    parser.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS),
                        help="run only these experiments (default: all)")
    parser.add_argument("--output", type=Path, default=Path("results/theory"),
                        help="folder for <experiment>.json and .png (default: results/theory)")
    parser.add_argument("--n", type=int, default=None,
                        help="box inputs per error measurement, half corners (default 10000, 2000 with --quick)")
    parser.add_argument("--max-d", type=int, default=64,
                        help="largest target width timed (default 64: a 4,096² system; 128 needs ~4 GB and minutes)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as in the README numbers)")
    args = parser.parse_args()
    args.n = args.n or (2000 if args.quick else 10_000)
    torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        start = time.perf_counter()
        settings, rows, fig = EXPERIMENTS[name](args)
        settings.update(quick=args.quick, n_inputs=args.n, seconds=round(time.perf_counter() - start, 1),
                        torch=torch.__version__)
        fig.tight_layout()
        fig.savefig(args.output / f"{name}.png", dpi=110)
        plt.close(fig)
        tmp = args.output / f"{name}.json.tmp"
        data = rows if isinstance(rows, dict) else {"rows": rows}  # extra tables beside "rows" come as a dict
        tmp.write_text(json.dumps({"experiment": name, "doc": EXPERIMENTS[name].__doc__, "settings": settings, **data},
                                  indent=1))
        tmp.replace(args.output / f"{name}.json")
        print(f"{name}: {settings['seconds']} s -> {args.output / name}.json/.png", flush=True)


if __name__ == "__main__":
    main()
