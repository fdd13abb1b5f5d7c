"""The counted code (issue 25): the shipped self-extracting form holds the program without what only a reader needs
(docstrings, comments, signature annotations, blank lines, indentation beyond one space a level), and is still
exactly the readable script's program."""
from __future__ import annotations

import ast

import train_gpt as tg
from conftest import REPO

SOURCE = (REPO / "train_gpt.py").read_bytes()

TRICKY = '''"""Module docstring."""
import os  # a comment


class Empty:
    """Only a docstring."""


def f(a: int, b: "list[str]" = None, *args: float, c: dict[str, int] = {}, **kw: object) -> tuple[int, int]:
    """Docstring
    over lines."""
    text = """keep
      this indentation   # not a comment
"""
    s = "# not a comment either" + f"{a:>4}"  # but this one is
    total = (a +
                 len(text))  # inside brackets
    if total > \\
            3:
        return total, len(s)
    return a, 0  # ²: not ASCII before a cut


class K:
    def g(self) -> "K":
        return self
'''


def test_the_counted_source_is_the_same_program_and_smaller():
    counted = tg.counted_source(SOURCE)
    assert counted != SOURCE and len(counted) < 0.75 * len(SOURCE)
    assert tg.program(counted.decode()) == tg.program(SOURCE.decode())
    assert b'"""' not in counted and b"    " not in counted.split(b"\n")[200]
    assert len(tg.self_extracting(SOURCE)) < len(tg.WRAPPER_HEAD) + len(tg.WRAPPER_TAIL) + 0.3 * len(SOURCE)


def test_what_a_reader_needs_is_gone_and_what_runs_is_kept():
    counted = tg.counted_source(TRICKY.encode()).decode()
    assert tg.program(counted) == tg.program(TRICKY)
    assert "docstring" not in counted.lower() and "# a comment" not in counted and "but this one" not in counted
    assert "# not a comment either" in counted and '"""keep\n      this indentation   # not a comment\n"""' in counted
    assert "def f(a, b = None, *args, c = {}, **kw):" in counted and "def g(self):" in counted
    assert "class Empty:\n pass" in counted
    namespace: dict = {}
    exec(compile(counted, "counted", "exec"), namespace)
    assert namespace["f"](7) == (7 + len('keep\n      this indentation   # not a comment\n'), 26)


def test_a_source_it_cannot_edit_line_by_line_is_counted_whole():
    """A docstring sharing its line with a statement: dropping the line would change the program, which the check
    sees; the source is then counted as it is."""
    source = b'def f():\n    "doc"; return 1\n'
    assert tg.counted_source(source) == source
    ast.parse(source)
