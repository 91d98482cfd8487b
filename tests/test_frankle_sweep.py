"""scripts/frankle_sweep.py and scripts/sweep_report.py on a two-run sweep of ResNet-8 on cifar10-mini."""

import json
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))  # as when the script runs: frankle_sweep imports sweep_report
import frankle_sweep as sweep  # noqa: E402


@pytest.fixture
def tiny_sweep(monkeypatch, tmp_path, shared_data):
    data = shared_data / "cifar10-mini"
    if not data.is_dir():
        pytest.skip(f"{data} is missing")
    plan = [sweep.Run(8, 1, "norm", epochs=2), sweep.Run(8, 1, "output", epochs=2)]
    monkeypatch.setattr(sweep, "cpu_plan", lambda: plan)
    monkeypatch.setattr(sweep, "SWEEP", tmp_path / "sweep")
    monkeypatch.setattr(sweep, "DATA", str(data))
    monkeypatch.setenv("NORMONLY_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(ROOT)
    return tmp_path / "sweep", plan


@pytest.mark.slow
def test_the_sweep_runs_what_is_unfinished_rebuilds_its_report_and_reproduces_a_first_epoch(tiny_sweep, capsys):
    folder, plan = tiny_sweep
    sweep.main(["--list"])
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in listed] == [[run.name, "not", "started"] for run in plan]
    assert all("--resume" in line and "--epochs 2" in line for line in listed)

    sweep.main([])
    for run in plan:
        results = json.loads((folder / run.name / "results.json").read_text())
        assert results["epochs_run"] == 2 and results["mode"] == run.train
    report = json.loads((folder / "sweep.json").read_text())
    assert [r["name"] for r in report["runs"]] == [run.name for run in plan]
    assert 0 <= report["runs"][0]["gamma_disabled"] <= 1  # γ analysis of the BatchNorm-only run
    table = (folder / "table.md").read_text().splitlines()
    assert len(table) == 2 + len(plan) and table[2].startswith(f"| {plan[0].name} | 8 | 1 | norm | 2 cosine |")
    assert (folder / "sweep.png").stat().st_size > 10_000
    assert (folder / plan[0].name / "adapter" / "adapter_model.safetensors").is_file()

    capsys.readouterr()
    sweep.main(["--list"])
    assert all(" done (" in line for line in capsys.readouterr().out.splitlines())

    def no_training(*args, **kwargs):
        raise AssertionError(f"a finished run was started again: {args}")

    finished = {run.name: (folder / run.name / "metrics.jsonl").read_text() for run in plan}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sweep.subprocess, "run", no_training)
        sweep.main([])  # every run is done: nothing starts, the report is rebuilt
    assert {run.name: (folder / run.name / "metrics.jsonl").read_text() for run in plan} == finished

    capsys.readouterr()
    sweep.main(["--check", plan[0].name])
    assert "identical" in capsys.readouterr().out


def test_unknown_run_names_are_refused_with_the_way_to_list_them(tiny_sweep, capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--only", "r9-w1-norm"])
    assert "no run named ['r9-w1-norm']; see --list" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--check", "r9-w1-norm"])
    assert "--check: no run named 'r9-w1-norm'" in capsys.readouterr().err


def test_the_cpu_plan_covers_the_issues_grid_at_one_budget():
    plan = sweep.cpu_plan()
    names = [run.name for run in plan]
    assert len(names) == len(set(names))
    grid = {(r.depth, r.width, r.train) for r in plan if (r.epochs, r.schedule) == (15, "cosine")}
    assert {(d, 1, "norm") for d in (14, 20, 32, 56, 110)} <= grid
    assert {(d, 1, "output") for d in (14, 20, 32, 56, 110)} <= grid
    assert {(d, 1, "random") for d in (14, 56, 110)} <= grid
    assert {(14, w, "norm") for w in (1, 2, 4)} <= grid and {(14, 1, "all"), (56, 1, "all")} <= grid
    assert sweep.Run(14, 1, "norm", 160, "multistep") in plan
    assert {r.precision for r in plan} == {"bf16"}
