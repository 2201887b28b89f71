"""Every error check in csrc/ hands TORCH_CHECK one message string, and no host code streams into an ostream.

Why: TORCH_CHECK(cond, a, b, ...) formats a, b, ... through a std::ostringstream (c10::str), and on the lent GPU
machine (Ubuntu 24.04's g++ 13.3 building against the torch 2.11 wheel) any `ostream << number` compiled into an
extension segfaults, so a rejected input killed the process instead of raising (16th session, benchmarks/RESULTS.md).
The extension builds its messages with glowfast::message (std::to_string) instead. CI's compilers do not crash, so
this source check is what keeps the workaround from eroding; benchmarks/cpp_exception_probe.py checks the GPU machine.
"""

import re
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = sorted(p for p in CSRC.rglob("*") if p.suffix in {".h", ".cpp", ".cu", ".cuh"})


def _strip_comments(text: str) -> str:
    """C++ source without // and /* */ comments (string literals kept, so a '//' inside one survives)."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text[i] == '"':
            j = i + 1
            while text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _call_arguments(text: str, open_paren: int) -> list[str]:
    """The top-level, comma-separated arguments of the call whose '(' is at open_paren."""
    args, depth, start, i = [], 0, open_paren + 1, open_paren
    while True:
        c = text[i]
        if c == '"':
            i += 1
            while text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                args.append(text[start:i].strip())
                return args
        elif c == "," and depth == 1:
            args.append(text[start:i].strip())
            start = i + 1
        i += 1


def torch_checks(text: str) -> list[list[str]]:
    code = _strip_comments(text)
    return [_call_arguments(code, m.end() - 1) for m in re.finditer(r"\bTORCH_CHECK\s*\(", code)]


def test_the_parser_sees_what_the_rule_is_about():
    """The checks below rest on this parser: several message arguments, commas and parentheses inside strings
    and nested calls, and a TORCH_CHECK named only in a comment."""
    src = '''
    // TORCH_CHECK(a, b, c) in a comment is no call
    TORCH_CHECK(x.dim() == 1, op, ": got ", x.dim(), "-D");
    TORCH_CHECK(f(a, b) && g(c), message(op, ": (a, b) is \\"bad\\", n=", n));
    /* TORCH_CHECK(y, z, w); */ TORCH_CHECK(ok, "one, literal");
    '''
    assert torch_checks(src) == [
        ["x.dim() == 1", "op", '": got "', "x.dim()", '"-D"'],
        ["f(a, b) && g(c)", 'message(op, ": (a, b) is \\"bad\\", n=", n)'],
        ["ok", '"one, literal"'],
    ]


def test_the_extension_has_checks_to_keep_to_the_rule():
    assert SOURCES and sum(len(torch_checks(p.read_text())) for p in SOURCES) >= 15


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(CSRC)))
def test_every_torch_check_has_one_message_string(path):
    bad = [args for args in torch_checks(path.read_text())
           if len(args) != 2 or not (args[1].startswith("message(") or re.fullmatch(r'"([^"\\]|\\.)*"', args[1]))]
    assert not bad, f"{path.name}: TORCH_CHECK with other than one message(...) or string literal: {bad}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(CSRC)))
def test_no_code_formats_text_through_a_stream(path):
    """No std::ostringstream, std::cout/cerr or c10::str (a stream inside) anywhere in the extension."""
    code = _strip_comments(path.read_text())
    found = re.findall(r"\b(?:std::\w*stream\b|o?stringstream\b|ostream\b|std::cout\b|std::cerr\b|c10::str\s*\()", code)
    assert not found, f"{path.name} formats text through a stream ({found}); build messages with glowfast::message"
