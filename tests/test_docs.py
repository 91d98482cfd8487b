"""The documentation: README.md and docs/ run as written, the site builds, the README stays short.

Every fenced ```python block runs: a page's blocks in order, in one namespace, in a fresh process whose working
directory is an empty temporary folder and whose network is cut. A block preceded by the line
``<!-- not run: REASON -->`` is skipped (it needs a trained run, a dataset, a GPU or minutes of CPU). Shell blocks
are never run; a page that has them says so. See docs/contributing.md.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
README_MAX_LINES = 250
PAGE_TIMEOUT_S = 180  # all of a page's blocks together; each page takes seconds

NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(?P<reason>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
SHELL = {"bash", "sh", "shell", "console", "zsh"}
SHELL_NOTE = "not run by the tests"


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None  # the reason, when marked


def code_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, indentation removed, with their not-run markers."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, start = len(m["indent"]), m["fence"], i
        body, i = [], i + 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        marker = NOT_RUN.match(lines[start - 1]) if start > 0 else None
        blocks.append(Block(page, start + 1, m["lang"].lower(), "\n".join(body) + "\n",
                            marker["reason"] if marker else None))
        i += 1
    return blocks


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _runnable(page: Path) -> list[Block]:
    return [b for b in code_blocks(page) if b.lang in ("python", "py") and b.not_run is None]


# Run in a fresh interpreter: the blocks of one page share a namespace, see no network, and leave nothing behind.
RUNNER = r"""
import json, os, socket, sys, traceback

def _no_network(*args, **kwargs):
    raise RuntimeError("documentation examples must not use the network")

_connect = socket.socket.connect
def _local_only(self, address):
    if self.family == getattr(socket, "AF_UNIX", None):
        return _connect(self, address)
    _no_network()
socket.socket.connect = _local_only
socket.create_connection = _no_network

blocks = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
for block in blocks:
    try:
        exec(compile(block["code"], block["where"], "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: the block at {block['where']}", file=sys.stderr)
        sys.exit(1)
"""


@pytest.mark.parametrize("page", [p for p in PAGES if _runnable(p)], ids=_name)
def test_python_blocks_of_the_page_run(page, tmp_path):
    blocks = [{"code": b.code, "where": f"{_name(page)}:{b.line}"} for b in _runnable(page)]
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "MPLBACKEND": "Agg",
        "NORMONLY_CACHE": str(tmp_path / "cache"),
    }
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks), cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=PAGE_TIMEOUT_S)
    assert run.returncode == 0, f"{_name(page)}: a code block failed\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    assert time.monotonic() - start < PAGE_TIMEOUT_S


def test_every_not_run_marker_sits_on_a_code_block_and_gives_a_reason():
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if "not run" in line and line.strip().startswith("<!--"):
                m = NOT_RUN.match(line)
                assert m and m["reason"], f"{_name(page)}:{i + 1}: write the marker as <!-- not run: REASON -->"
                following = lines[i + 1] if i + 1 < len(lines) else ""
                assert FENCE.match(following), f"{_name(page)}:{i + 1}: the marker must be the line just before a fence"


def test_pages_with_shell_blocks_say_that_the_tests_do_not_run_them():
    for page in PAGES:
        if any(b.lang in SHELL for b in code_blocks(page)):
            assert SHELL_NOTE in " ".join(page.read_text(encoding="utf-8").split()), \
                f"{_name(page)} has shell blocks: say once that they are {SHELL_NOTE}"


def test_the_code_block_reader_finds_runnable_and_marked_blocks(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n\n```python\na = 1\n```\n\n<!-- not run: needs a GPU -->\n```python\ncuda()\n```\n\n"
                    "- item\n\n  ```python\n  b = a + 1\n  ```\n\n```bash\nmake test\n```\n")
    blocks = code_blocks(page)
    assert [(b.lang, b.code, b.not_run) for b in blocks] == [
        ("python", "a = 1\n", None), ("python", "cuda()\n", "needs a GPU"),
        ("python", "b = a + 1\n", None), ("bash", "make test\n", None)]
    assert [b.line for b in blocks] == [3, 8, 14, 18]


def test_readme_is_short_and_shows_the_ci_test_command():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in text


def test_readme_links_point_to_files_and_headings_that_exist():
    from markdown.extensions.toc import slugify

    for target in re.findall(r"\]\(([^)\s]+)\)", README.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        assert (ROOT / path).exists(), f"README.md links to {path}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(encoding="utf-8"), flags=re.M)
            assert anchor in {slugify(h, "-") for h in headings}, f"README.md links to {target}: no such heading"


@pytest.mark.parametrize("recipe", ["resnet_cifar", "finetune_text", "finetune_vision", "finetune_causal_lm"])
def test_each_recipe_page_documents_every_flag(recipe):
    help_text = subprocess.run([sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), "--help"],
                               capture_output=True, text=True, check=True, timeout=60).stdout
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", help_text)) - {"--help"}
    page = (DOCS / "recipes" / f"{recipe}.md").read_text(encoding="utf-8")
    missing = sorted(f for f in flags if f"`{f}" not in page)
    assert not missing, f"docs/recipes/{recipe}.md does not document {missing} (see `{recipe}.py --help`)"


def test_the_site_builds_strict(tmp_path):  # about 2 s
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-6000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()
    assert (tmp_path / "site" / "results" / "theory" / "exactness.png").is_file()
