"""Griffe extension: render normonly's reST-flavoured docstrings as Markdown in the API reference.

normonly's docstrings hold bare doctest-style examples (as numpy's and torch's do) and Sphinx roles
(``:func:`name```). Markdown would read ``>>>`` as nested block quotes and show the roles verbatim, so each run
of ``>>>`` / ``...`` lines (with their output lines, up to a blank line) becomes a fenced ``pycon`` block and a
role becomes inline code. The source files are not changed.
"""

import re

import griffe

ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj):`~?([^`]+)`")


def fence_doctests(text: str) -> str:
    out, block, indent = [], [], ""

    def flush():
        if block:
            out.extend([f"{indent}```pycon", *block, f"{indent}```"])
            block.clear()

    for line in text.splitlines():
        stripped = line.lstrip()
        if stripped.startswith(">>>"):
            if not block:
                indent = line[: len(line) - len(stripped)]
            block.append(line)
        elif block and stripped:
            block.append(line)  # a continuation ("...") or the example's output
        else:
            flush()
            out.append(line)
    flush()
    return "\n".join(out)


class MarkdownDocstrings(griffe.Extension):
    def on_object(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
        if obj.docstring is not None and ":`" in obj.docstring.value:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
