"""The inventory of the suite's assertions: for every test function (and every ``assert*``/``check*`` helper), each
``assert`` and each call of an ``assert*`` function, with the upper-case module-level constants it names (the
tolerances: ``REL_TOL[=1e-05]``) resolved to their values.

Why: the suite is reshaped for time (shared fixtures, fewer programs), and a reshaping must not drop or loosen a
parity check. Two inventories, one written before a change and one after, diff to exactly the assertions that
moved, changed or vanished. Run from the repository root:

    python tests/parity_inventory.py > tests/parity/inventory.txt
    python tests/parity_inventory.py --compare tests/parity/inventory-35f6c97.txt   # what was lost or changed

A line is ``test_file::function | assertion``; parametrized cases share their function's lines (pytest's
``--collect-only -q`` lists the cases themselves). Pure standard library: it reads the files, imports nothing.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

TESTS = pathlib.Path(__file__).resolve().parent


def module_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level names bound to a literal number (or a tuple/dict of them), as source text."""
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                ast.literal_eval(node.value)
            except ValueError:
                continue
            constants[node.targets[0].id] = ast.unparse(node.value)
    return constants


class _Resolve(ast.NodeTransformer):
    def __init__(self, constants: dict[str, str]):
        self.constants = constants

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in self.constants and node.id.isupper():
            return ast.Name(id=f"{node.id}[={self.constants[node.id]}]", ctx=node.ctx)
        return node


def assertions(fn: ast.FunctionDef, constants: dict[str, str]) -> list[str]:
    """Every ``assert`` and every call of an ``assert*`` helper inside ``fn``, as one line of source."""
    found = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Assert):
            text = ast.unparse(_Resolve(constants).visit(node.test))
        elif isinstance(node, ast.Call) and "assert" in ast.unparse(node.func).split(".")[-1]:
            text = ast.unparse(_Resolve(constants).visit(node))
        else:
            continue
        found.append(" ".join(text.split()))
    return found


def inventory(root: pathlib.Path = TESTS) -> list[str]:
    lines = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        constants = module_constants(tree)
        rel = path.relative_to(root.parent).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (
                    node.name.startswith("test") or node.name.startswith("assert") or node.name.startswith("check")):
                for text in assertions(node, constants):
                    lines.append(f"{rel}::{node.name} | {text}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", metavar="INVENTORY", help="print the lines of INVENTORY missing from today's")
    args = parser.parse_args(argv)
    now = inventory()
    if not args.compare:
        print("\n".join(now))
        return 0
    assertions_now = {line.split(" | ", 1)[1] for line in now}
    before = pathlib.Path(args.compare).read_text().splitlines()
    missing = [line for line in before if line.split(" | ", 1)[1] not in assertions_now]
    for line in missing:
        print(f"missing: {line}")
    print(f"{len(before)} assertions before, {len(now)} now, {len(missing)} of the earlier ones not found verbatim")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
