"""CaseOps: a lossless case transform of text, so that a tokenizer sees 'golf', 'Golf' and 'GOLF' as one lowercase
word plus a case operator (the records' `lossless_caps_caseops_v1`, written here from its description).

    python data/caseops.py encode < text.txt > transformed.txt
    python data/caseops.py decode < transformed.txt > text.txt

Four private-use characters are the operators:

    TITLE    U+E001  the next ASCII letter is upper case
    ALLCAPS  U+E002  the following run of ASCII letters is upper case
    CAPNEXT  U+E003  the next ASCII letter is upper case (inside a mixed-case run)
    ESC      U+E004  the next character is one of these four, occurring literally in the text

encode() rewrites each maximal run of ASCII letters [A-Za-z]+:

    all lower case            unchanged                         golf   -> golf
    all upper, length >= 2    ALLCAPS + lower case              GOLF   -> ⟨ALLCAPS⟩golf
    upper, then all lower     TITLE + lower case (so also 'A')  Golf   -> ⟨TITLE⟩golf       A -> ⟨TITLE⟩a
    any other mix             TITLE if the first letter is upper, then CAPNEXT before every later upper letter
                                                                OpenAI -> ⟨TITLE⟩open⟨CAPNEXT⟩a⟨CAPNEXT⟩i
                                                                iPhone -> i⟨CAPNEXT⟩phone

Every other character stays as it is (non-ASCII letters too: 'École' -> 'École', 'éCOLE' -> 'é⟨ALLCAPS⟩cole'),
except an operator character found in the text, which gets ESC in front. decode() inverts encode() exactly:
decode(encode(s)) == s for every string s; it refuses (ValueError) an operator that is not followed by what encode()
puts after it.
"""
from __future__ import annotations

import argparse
import re
import sys

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)  # in this order they are the user-defined pieces of a CaseOps tokenizer
NAMES = {TITLE: "TITLE", ALLCAPS: "ALLCAPS", CAPNEXT: "CAPNEXT", ESC: "ESC"}

_RUN_OR_OPERATOR = re.compile("[A-Za-z]+|[\ue001-\ue004]")
_DECODE = re.compile("\ue004([\ue001-\ue004])|\ue002([a-z]+)|[\ue001\ue003]([a-z])|[\ue001-\ue004]")


def _encode_run(m: re.Match) -> str:
    w = m.group()
    if w in OPERATORS:
        return ESC + w
    if w.islower():  # w holds ASCII letters only, so islower/isupper mean exactly that
        return w
    if len(w) >= 2 and w.isupper():
        return ALLCAPS + w.lower()
    if w[0].isupper() and (len(w) == 1 or w[1:].islower()):
        return TITLE + w.lower()
    head = TITLE + w[0].lower() if w[0].isupper() else w[0]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in w[1:])


def encode(text: str) -> str:
    """The CaseOps form of `text` (see the module's description)."""
    return _RUN_OR_OPERATOR.sub(_encode_run, text)


def _decode_one(m: re.Match) -> str:
    literal, caps, letter = m.groups()
    if literal:
        return literal
    if caps:
        return caps.upper()
    if letter:
        return letter.upper()
    op = m.group()
    expected = "an operator character" if op == ESC else "a run of lower-case ASCII letters" if op == ALLCAPS \
        else "a lower-case ASCII letter"
    raise ValueError(f"character {m.start()}: {NAMES[op]} (U+{ord(op):04X}) is not followed by {expected}")


def decode(text: str) -> str:
    """The text that encode() turned into `text`; ValueError naming the position of a stray operator."""
    return _DECODE.sub(_decode_one, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The CaseOps case transform: text on stdin, its encoded (or decoded) "
                                "form on stdout, UTF-8.")
    p.add_argument("direction", choices=("encode", "decode"))
    args = p.parse_args(argv)
    raw = sys.stdin.buffer.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        print(f"error: stdin: not valid UTF-8 ({exc.reason} at byte {exc.start})", file=sys.stderr)
        return 2
    try:
        out = encode(text) if args.direction == "encode" else decode(text)
    except ValueError as exc:
        print(f"error: stdin: {exc}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(out.encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
