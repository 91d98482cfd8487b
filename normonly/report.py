"""Compare recipe runs: one table (markdown and CSV) and one PNG from their run folders.

A run folder holds ``results.json`` (flat: ``accuracy``, ``trainable_params``, ``seconds``, ``method`` or ``train``,
``adapter_bytes``, ...) and, for ``recipes/resnet_cifar.py``, ``metrics.jsonl`` (one JSON object per epoch). Used by
``normonly report``; ``plot_curves`` also draws one run's training curves for the recipes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

__all__ = ["COLUMNS", "load_run", "read_metrics", "table_rows", "to_markdown", "to_csv", "plot_runs", "plot_curves",
           "write_report"]

COLUMNS = ("run", "method", "accuracy", "trainable_params", "total_params", "adapter_bytes", "seconds")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The per-epoch records of a ``metrics.jsonl``; a bad line raises ``ValueError`` naming the file and line."""
    path, records = Path(path), []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; the file is corrupt") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number}: not valid JSON ({err.msg}); the file is corrupt or truncated") from None
        except RecursionError:
            raise ValueError(f"{path} line {number}: nested too deeply to be an epoch record") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number}: a JSON {type(record).__name__}, expected one object per epoch")
        records.append(record)
    return records


def load_run(path: str | os.PathLike) -> dict:
    """Read one run: ``{"path", "results", "records", "adapter_bytes"}``. ``path`` is a run folder or a results
    JSON file; a missing or corrupt file raises an error naming it."""
    from .safe_io import read_json

    path = Path(path)
    if path.is_dir():
        folder, source = path, path / "results.json"
        if not source.is_file():
            raise FileNotFoundError(f"{source} does not exist: pass run folders written by a recipe (they end with "
                                    "results.json; an unfinished run has none)")
        results = read_json(source)
    elif path.is_file():
        folder, results, source = None, read_json(path), path
    else:
        raise FileNotFoundError(f"{path} does not exist: pass run folders that hold results.json")
    accuracy = results.get("accuracy")
    if not isinstance(accuracy, (int, float)) or isinstance(accuracy, bool) or not 0 <= accuracy <= 1:
        raise ValueError(f"{source}: 'accuracy' must be a fraction in [0, 1], got {str(accuracy)[:40]}")
    records = []
    if folder is not None and (folder / "metrics.jsonl").is_file():
        records = read_metrics(folder / "metrics.jsonl")
    size = results.get("adapter_bytes")
    if size is None and folder is not None and (folder / "adapter").is_dir():
        files = [p for p in (folder / "adapter").iterdir() if p.suffix == ".safetensors" and p.is_file()]
        size = sum(p.stat().st_size for p in files) if files else None
    return {"path": path, "results": results, "records": records, "adapter_bytes": size}


def _names(paths: list[Path]) -> list[str]:
    """Folder (or file stem) names, or the paths as given where two names would clash."""
    short = [p.name if p.is_dir() else p.stem for p in paths]
    return [s if short.count(s) == 1 else str(p) for s, p in zip(short, paths)]


def table_rows(runs: list[dict]) -> list[dict]:
    """One row per run (from ``load_run``) with the ``COLUMNS``, values raw (None where unknown)."""
    rows = []
    for name, run in zip(_names([r["path"] for r in runs]), runs):
        res = run["results"]
        rows.append({
            "run": name,
            "method": res.get("method") or res.get("train") or res.get("mode"),
            "accuracy": float(res["accuracy"]),
            "trainable_params": res.get("trainable_params"),
            "total_params": res.get("total_params"),
            "adapter_bytes": run["adapter_bytes"],
            "seconds": res.get("seconds"),
        })
    return rows


def _seconds(s) -> str:
    if not isinstance(s, (int, float)):
        return ""
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _params(row: dict) -> str:
    n, total = row["trainable_params"], row["total_params"]
    if not isinstance(n, int):
        return ""
    return f"{n:,} ({100 * n / total:.3g} %)" if isinstance(total, int) and total > 0 else f"{n:,}"


def to_markdown(rows: list[dict]) -> str:
    """A markdown table of ``table_rows`` output, formatted for reading (accuracy in %, sizes with separators)."""
    lines = ["| run | method | accuracy | trainable params | adapter | time |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        size = f"{r['adapter_bytes']:,} B" if isinstance(r["adapter_bytes"], int) else ""
        cells = [r["run"], r["method"] or "", f"{100 * r['accuracy']:.2f} %", _params(r), size, _seconds(r["seconds"])]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    """The rows as CSV text with the raw values (accuracy as a fraction, sizes in bytes, time in seconds)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if r[k] is None else r[k] for k in COLUMNS} for r in rows)
    return out.getvalue()


def _figure(ncols: int, width: float):
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state, Agg when saving
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install matplotlib (or normonly[dev])") from err
    fig = Figure(figsize=(width * ncols, 4.2))
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _series(records: list[dict], key: str) -> tuple[list, list]:
    points = [(r.get("epoch", i + 1), r[key]) for i, r in enumerate(records)
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [e for e, _ in points], [v for _, v in points]


def plot_runs(runs: list[dict], path: str | os.PathLike) -> Path:
    """A PNG: test accuracy per run as bars, plus test accuracy and train loss per epoch for runs with metrics."""
    rows, curves = table_rows(runs), [(n, r["records"]) for n, r in zip(_names([r["path"] for r in runs]), runs)]
    curves = [(n, recs) for n, recs in curves if recs]
    fig, axes = _figure(3 if curves else 1, 5.0)
    names = [r["run"] if not r["method"] else f"{r['run']}\n({r['method']})" for r in rows]
    bars = axes[0].bar(range(len(rows)), [100 * r["accuracy"] for r in rows], color="tab:blue")
    axes[0].bar_label(bars, fmt="%.1f", fontsize=8)
    axes[0].set_xticks(range(len(rows)), names, rotation=30 if len(rows) > 3 else 0, ha="right" if len(rows) > 3
                       else "center", fontsize=8)
    axes[0].set(title="accuracy per run", ylabel="accuracy (%)", ylim=(0, 100))
    for name, records in curves:
        epochs, accuracy = _series(records, "test_accuracy")
        axes[1].plot(epochs, [100 * v for v in accuracy], marker=".", label=name)
        axes[2].plot(*_series(records, "train_loss"), marker=".", label=name)
    if curves:
        axes[1].set(title="test accuracy", xlabel="epoch", ylabel="accuracy (%)")
        axes[2].set(title="train loss", xlabel="epoch", ylabel="loss")
        for ax in axes[1:]:
            ax.legend(fontsize=8)
    return _save(fig, path)


def plot_curves(records: list[dict], path: str | os.PathLike) -> Path:
    """Draw one run's train/test accuracy and loss per epoch (``metrics.jsonl`` records) into a PNG; returns its path.

    >>> plot_curves(read_metrics("runs/r14-norm/metrics.jsonl"), "runs/r14-norm/curves.png")
    """
    if not records:
        raise ValueError("plot_curves needs at least one epoch record (metrics.jsonl is empty)")
    fig, (acc, loss) = _figure(2, 5.0)
    for split in ("train", "test"):
        epochs, values = _series(records, f"{split}_accuracy")
        acc.plot(epochs, [100 * v for v in values], marker=".", label=split)
        loss.plot(*_series(records, f"{split}_loss"), marker=".", label=split)
    acc.set(title="accuracy", xlabel="epoch", ylabel="accuracy (%)")
    loss.set(title="loss", xlabel="epoch", ylabel="loss")
    acc.legend()
    loss.legend()
    return _save(fig, path)


def write_report(runs: list[dict], prefix: str | os.PathLike = "report") -> tuple[str, list[Path]]:
    """Write ``PREFIX.md``, ``PREFIX.csv`` and ``PREFIX.png`` for ``runs`` (from ``load_run``); returns the markdown
    table and the three paths.

    >>> markdown, paths = write_report([load_run("runs/r14-norm"), load_run("runs/r14-all")], "runs/report")
    """
    rows = table_rows(runs)
    markdown, prefix = to_markdown(rows), Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md, table = prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".csv")
    md.write_text(markdown, encoding="utf-8")
    table.write_text(to_csv(rows), encoding="utf-8")
    png = plot_runs(runs, prefix.with_name(prefix.name + ".png"))
    return markdown, [md, table, png]
