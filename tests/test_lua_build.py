"""How the scripts are built: common.lua's definitions a script never names are left out."""

from __future__ import annotations

import re

import pytest

from callguard.engine.core import LUA, SCRIPTS, script_sources, with_common

COMMON = (LUA / "common.lua").read_text()
DEFINED = re.findall(r"^local (?:function )?(\w+)", COMMON, re.M)


def common_part(built: str) -> str:
    return "\n".join(built.split("\n")[:COMMON.count("\n") + 1])


def code_names(lua: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_]\w*", re.sub(r"(?m)^\s*--.*$", "", lua)))


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_script_keeps_what_it_names_and_its_line_numbers(name):
    script = (LUA / f"{name}.lua").read_text()
    built = script_sources()[name]
    assert built.split("\n") == with_common(COMMON, script).split("\n")
    full = COMMON + "\n" + script
    assert built.count("\n") == full.count("\n")  # errors name the same lines
    assert built.endswith("\n" + script)
    kept_text = common_part(built)
    kept = set(re.findall(r"^local (?:function )?(\w+)", kept_text, re.M))
    # Every definition named by code that runs (the script, or a kept definition) is kept.
    assert {d for d in DEFINED if d in code_names(script + "\n" + kept_text)} <= kept
    # Kept lines are common.lua's own, in place; the others are blank.
    for kept_line, line in zip(kept_text.split("\n"), COMMON.split("\n"), strict=True):
        assert kept_line in (line, "")


def test_answer_builds_only_what_it_uses():
    kept = re.findall(r"^local (?:function )?(\w+)", common_part(script_sources()["answer"]),
                      re.M)
    assert kept == ["idiv", "clock", "num"]


HMGET_TABLE = re.compile(r"redis\.call\('HMGET', \w+, ([^)]*)\)\s*\n"
                         r"\s*(?:return|local \w+ =) \{([^}]*)\}")


def test_a_table_written_whole_names_each_field_of_its_hmget():
    found = 0
    for path in LUA.glob("*.lua"):
        for names, table in HMGET_TABLE.findall(path.read_text()):
            names = re.findall(r"'(\w+)'", names)
            pairs = re.findall(r"(\w+) = v\[(\d+)\]", table)
            assert pairs == [(name, str(k)) for k, name in enumerate(names, 1)], path.name
            assert len(pairs) == table.count("=")
            found += 1
    assert found == 3  # authorize's account, extend's, finish's
