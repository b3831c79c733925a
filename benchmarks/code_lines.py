"""Code lines of a package at a git revision: no docstrings, comments or blank lines.

Issue 16 asks for ``hrad/detectors/`` to shrink; raw ``wc -l`` counts the deviation notes in
docstrings too, so this counts only lines that hold code (``ast`` finds the docstrings,
``tokenize`` the code tokens).

    python benchmarks/code_lines.py 13c49e7 HEAD --under hrad/detectors
"""

from __future__ import annotations

import argparse
import ast
import io
import subprocess
import tokenize
from collections.abc import Sequence

SKIPPED_TOKENS = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def docstring_lines(tree: ast.AST) -> set[int]:
    """Line numbers of every bare string expression (module, class and function docstrings, attribute notes)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return lines


def code_lines(source: str) -> int:
    docs = docstring_lines(ast.parse(source))
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in SKIPPED_TOKENS:
            lines.update(line for line in range(token.start[0], token.end[0] + 1) if line not in docs)
    return len(lines)


def count(revision: str, under: str) -> dict[str, int]:
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", revision, under], capture_output=True, text=True, check=True).stdout.split()
    return {
        name: code_lines(subprocess.run(["git", "show", f"{revision}:{name}"], capture_output=True, text=True, check=True).stdout)
        for name in sorted(names)
        if name.endswith(".py")
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revisions", nargs="+")
    parser.add_argument("--under", default="hrad/detectors")
    args = parser.parse_args(argv)
    for revision in args.revisions:
        counts = count(revision, args.under)
        for name, lines in counts.items():
            print(f"{lines:6d}  {name}")
        print(f"{sum(counts.values()):6d}  code lines under {args.under} at {revision}\n")


if __name__ == "__main__":
    main()
