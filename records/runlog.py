"""The one reader of train_gpt.py's log, for every tool of the project (train_gpt.py itself never imports it).

A log is the script's readable source, a line of 100 '=', an environment block (Python and PyTorch versions,
nvidia-smi), another such line, then the body, where almost every line is `prefix key:value key:value ...`:

    step:30/30 val_loss:6.2233 val_bpb:3.6207 train_time:4904ms step_avg:163.45ms lr_mul:0.0000
    final_int6_sliding_window_exact val_loss:6.25268294 val_bpb:3.63777171 tokens:4096 bytes:10157 subset

Each is read generically into a Line (its name: the first word, or the key of a leading `key:value`). Two forms need
care: `hparam NAME=value`, and amount lines such as `Code size: 27222 bytes`, whose labels hold spaces.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

SEPARATOR = b"=" * 100
FIELD = re.compile(r"([A-Za-z_][\w.]*):(\S*)")
AMOUNT = re.compile(r"([A-Za-z][\w+ ]*?): (\d+) (?:bytes|MiB)\b")
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf|nan")
GPU_ROW = re.compile(r"\|\s+\d+\s+(\S.*?)\s+(?:On|Off)\s+\|")  # an nvidia-smi table row naming one GPU


class LogError(Exception):
    """A log that cannot be read; the message names the file."""


@dataclass
class Line:
    """One body line: its name, its `key:value` fields (a leading one included) and the bare words after the name."""

    name: str
    fields: dict[str, str]
    words: list[str]
    text: str

    def num(self, key: str | None = None) -> float | None:
        """The number a field starts with ('4904ms' -> 4904.0, '30/30' -> 30.0); None when absent. Default key:
        the line's name (`seed:1337`, `Code size: 27222 bytes`)."""
        m = NUMBER.match(self.fields.get(self.name if key is None else key, ""))
        return float(m.group()) if m else None


def parse_line(text: str) -> Line | None:
    if AMOUNT.match(text):
        pairs = AMOUNT.findall(text)
        return Line(pairs[0][0], dict(pairs), [], text)
    tokens = text.split()
    if not tokens:
        return None
    first = FIELD.fullmatch(tokens[0])
    fields, words = ({first.group(1): first.group(2)} if first else {}), []
    for token in tokens[1:]:
        if m := FIELD.fullmatch(token):
            fields.setdefault(m.group(1), m.group(2))
        else:
            words.append(token)
    return Line(first.group(1) if first else tokens[0], fields, words, text)


@dataclass
class RunLog:
    path: Path
    source: bytes | None  # the embedded script; None when the log has no separator line
    env: list[str]
    hparams: dict[str, str]
    lines: list[Line]

    def all(self, name: str, value: str | None = None) -> list[Line]:
        """Lines called `name` (with `name:value` when value is given: all('budget', 'exceeded'))."""
        return [ln for ln in self.lines if ln.name == name and (value is None or ln.fields.get(name) == value)]

    def last(self, name: str, value: str | None = None) -> Line | None:
        found = self.all(name, value)
        return found[-1] if found else None

    def num(self, name: str, key: str | None = None) -> float | None:
        """A number of the last line called `name`: its field `key`, by default its own value."""
        line = self.last(name)
        return line.num(key) if line else None

    @property
    def train(self) -> list[Line]:
        return [ln for ln in self.all("step") if "train_loss" in ln.fields]

    @property
    def val(self) -> list[Line]:
        return [ln for ln in self.all("step") if "val_loss" in ln.fields]

    @property
    def seed(self) -> int | None:
        value = self.num("seed")
        if value is None and self.hparams.get("SEED", "").isdigit():
            value = int(self.hparams["SEED"])
        return None if value is None else int(value)

    @property
    def torch_version(self) -> str | None:
        return next((ln.split(maxsplit=2)[2] for ln in self.env if ln.startswith("Running PyTorch ")), None)

    @property
    def gpus(self) -> list[str]:
        """The GPUs nvidia-smi listed at the start (none on a machine without CUDA)."""
        return [m.group(1) for ln in self.env if (m := GPU_ROW.match(ln))]

    @property
    def subset_lines(self) -> list[Line]:
        """Final lines scored on a validation subset (train_gpt.py ends them with the word 'subset')."""
        return [ln for ln in self.lines if ln.name.startswith("final_") and ln.text.split()[-1] == "subset"]


def split_log(data: bytes) -> tuple[bytes | None, bytes, bytes]:
    """(embedded source or None, environment block, body) of a log's bytes."""
    parts = (b"\n" + data).split(b"\n" + SEPARATOR + b"\n", 2)  # the source ends with the newline before the first
    if len(parts) == 1:
        return None, b"", data
    return (parts[0][1:] + b"\n" if parts[0] else b""), (parts[1] if len(parts) == 3 else b""), parts[-1]


def parse(data: bytes, path: Path) -> RunLog:
    source, env, body = split_log(data)
    hparams, lines = {}, []
    for text in body.decode("utf-8", errors="replace").splitlines():
        if text.startswith("hparam ") and "=" in text:
            name, _, value = text[len("hparam "):].partition("=")
            hparams[name] = value
        elif line := parse_line(text):
            lines.append(line)
    return RunLog(path, source, env.decode("utf-8", errors="replace").splitlines(), hparams, lines)


def read(path: Path) -> RunLog:
    """The parsed log at `path`; LogError naming the file when it cannot be read."""
    try:
        return parse(Path(path).read_bytes(), Path(path))
    except FileNotFoundError:
        raise LogError(f"{path}: log file not found") from None
    except OSError as exc:
        raise LogError(f"{path}: cannot read the log ({exc.strerror or exc})") from None


def script_defaults(source: str | bytes) -> dict[str, object]:
    """The `HPARAMS = dict(NAME=default, ...)` table of a train_gpt.py source, read with ast (no import, no torch)."""
    for node in ast.parse(source).body:
        if (isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["HPARAMS"]
                and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "dict"):
            return {kw.arg: ast.literal_eval(kw.value) for kw in node.value.keywords}
    raise LogError("the script has no `HPARAMS = dict(...)` table")
