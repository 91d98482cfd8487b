"""MkDocs hook: publish the repository's results/ folder under results/ in the site.

Pages link figures and data where the runs wrote them (``results/theory/exactness.png`` from docs/theory.md),
so the site always shows the current files and `mkdocs build --strict` checks every such link. Markdown
tables under results/ become pages outside the navigation; checkpoints and weights are left out.
"""

from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

PUBLISHED = {".png", ".svg", ".json", ".jsonl", ".md", ".txt", ".csv"}


def on_files(files, config):
    root = Path(config["config_file_path"]).parent
    for path in sorted((root / "results").rglob("*")):
        if path.is_file() and path.suffix in PUBLISHED and "checkpoints" not in path.parts:
            uri = path.relative_to(root).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path), inclusion=InclusionLevel.NOT_IN_NAV))
    return files
