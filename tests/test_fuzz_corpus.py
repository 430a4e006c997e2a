"""The corpus bench/fuzz.py found (tests/fixtures/fuzz/<parser>/, crash inputs included)
replayed through the same targets, without atheris: what once crashed a parser stays fixed."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz_targets import TARGETS

CORPUS = Path(__file__).parent / "fixtures" / "fuzz"
INPUTS = sorted((p.parent.name, p.name) for p in CORPUS.glob("*/*"))


def test_every_parser_has_a_corpus() -> None:
    assert sorted(CORPUS.iterdir()) == [CORPUS / name for name in sorted(TARGETS)]
    assert {parser for parser, _ in INPUTS} == set(TARGETS)


@pytest.mark.parametrize(("parser", "name"), INPUTS, ids=[f"{p}/{n[:16]}" for p, n in INPUTS])
def test_replay(parser: str, name: str) -> None:
    TARGETS[parser]((CORPUS / parser / name).read_bytes())
