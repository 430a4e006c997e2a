"""A minimal FreeSWITCH 1.10 XML dialplan (mod_dialplan_xml): the simulated FreeSWITCH runs
the dialplan callguard ships rather than a copy of it in code.

Only the hunt is modelled: which actions a call gets on entering a context.  Running them
is the simulator's job; it expands each action's data with `expand` when the action runs,
as FreeSWITCH does.  What FreeSWITCH has but this does not model (inline actions, time
conditions, <regex>/<expression> children, nested conditions, X-PRE-PROCESS, api
expansions) raises ValueError, so no test passes on a dialplan FreeSWITCH reads otherwise.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_VARIABLE = re.compile(r"\$\{([^{}]*)\}")
_CAPTURE = re.compile(r"\$(?:(\d+)|\{(\d+)\})")  # switch_perform_substitution: $1, ${1}
_ATTRIBUTES = {"context": {"name"}, "extension": {"name", "continue"},
               "condition": {"field", "expression", "break"},
               "action": {"application", "data", "inline"},
               "anti-action": {"application", "data", "inline"}}
_BREAKS = ("on-false", "on-true", "always", "never")


def expand(data: str, variables: Mapping[str, str]) -> str:
    """${var} -> its value, "" when unset (switch_channel_expand_variables, one level)."""
    def one(match: re.Match) -> str:
        if not match[1] or " " in match[1] or "(" in match[1]:
            raise ValueError(f"expansion {match[0]} is not modelled")
        return variables.get(match[1], "")
    return _VARIABLE.sub(one, data)


def _true(value: str | None) -> bool:  # switch_true()
    value = (value or "").strip().lower()
    return value in ("yes", "on", "true", "t", "enabled", "active", "allow") or (
        value.isdigit() and int(value) != 0)


@dataclass(frozen=True)
class Condition:
    field: str | None  # None: an absolute condition, always true
    expression: str
    brk: str
    actions: tuple[tuple[str, str], ...]
    anti_actions: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Extension:
    name: str
    cont: bool
    conditions: tuple[Condition, ...]


def _children(parent: ET.Element, tags: tuple[str, ...], where: str) -> list[ET.Element]:
    for child in parent:
        if child.tag not in tags:
            raise ValueError(f"{where}: <{child.tag}> inside <{parent.tag}> is not modelled")
        extra = set(child.attrib) - _ATTRIBUTES[child.tag]
        if extra:
            raise ValueError(f"{where}: <{child.tag}> attribute(s) {sorted(extra)} not modelled")
    return list(parent)


def _condition(element: ET.Element, where: str) -> Condition:
    lists: dict[str, list[tuple[str, str]]] = {"action": [], "anti-action": []}
    for child in _children(element, ("action", "anti-action"), where):
        if not child.get("application"):
            raise ValueError(f"{where}: <{child.tag}> without an application")
        if _true(child.get("inline")):
            raise ValueError(f"{where}: inline actions are not modelled")
        lists[child.tag].append((child.get("application"), child.get("data", "")))
    brk = element.get("break", "on-false").lower()
    return Condition(element.get("field"), element.get("expression", ""),
                     brk if brk in _BREAKS else "on-false",  # FreeSWITCH ignores others
                     tuple(lists["action"]), tuple(lists["anti-action"]))


class Dialplan:
    def __init__(self, contexts: dict[str, list[Extension]]):
        self.contexts = contexts

    @classmethod
    def load(cls, *paths: str | Path) -> Dialplan:
        contexts: dict[str, list[Extension]] = {}
        for path in paths:
            try:
                root = ET.parse(path).getroot()
            except (ET.ParseError, OSError) as error:
                raise ValueError(f"{path}: cannot read the dialplan: {error}") from error
            if root.tag == "document":
                found = [s for s in root if s.tag == "section" and s.get("name") == "dialplan"]
                if len(found) != 1:
                    raise ValueError(f'{path}: <document> needs one <section name="dialplan">')
                root = found[0]
            elif root.tag != "include":
                raise ValueError(f"{path}: root must be <include> or <document>, not <{root.tag}>")
            for context in _children(root, ("context",), str(path)):
                name = context.get("name")
                where = f"{path}: context {name!r}"
                if not name or name in contexts:
                    raise ValueError(f"{where}: a context needs a name of its own")
                contexts[name] = [
                    Extension(ext.get("name", ""), _true(ext.get("continue")), tuple(
                        _condition(cond, f"{where}, extension {ext.get('name')!r}")
                        for cond in _children(ext, ("condition",), where)))
                    for ext in _children(context, ("extension",), where)]
        return cls(contexts)

    def hunt(self, context: str, fields: Mapping[str, str],
             variables: Mapping[str, str]) -> list[tuple[str, str]]:
        """The actions a call gets on entering `context` (dialplan_hunt + parse_exten).

        `fields`: the caller profile (destination_number, caller_id_number, context, ...);
        `variables`: the channel variables.  ${var} in a condition falls back to the
        profile, as switch_channel_get_variable does.  [] means no route: FreeSWITCH hangs
        up with NO_ROUTE_DESTINATION.
        """
        if context not in self.contexts:
            raise ValueError(f"no context {context!r} in the dialplan "
                             f"(known: {', '.join(sorted(self.contexts))})")
        lookup = ChainMap(dict(variables), dict(fields))
        found: list[tuple[str, str]] = []
        for extension in self.contexts[context]:
            if _parse_exten(extension, fields, lookup, found) and not extension.cont:
                break
        return found


def _parse_exten(extension: Extension, fields: Mapping[str, str], lookup: Mapping[str, str],
                 found: list[tuple[str, str]]) -> bool:
    """Adds the extension's actions; True when its last condition evaluated matched."""
    proceed = False
    for cond in extension.conditions:
        expression, match = expand(cond.expression, lookup), None
        if cond.field is None:
            proceed = True
        else:
            value = (expand(cond.field, lookup) if "$" in cond.field
                     else fields.get(cond.field, ""))
            try:
                match = re.search(expression, value)
            except re.error as error:
                raise ValueError(f"extension {extension.name!r}: bad expression "
                                 f"{expression!r}: {error}") from error
            proceed = match is not None
        if not proceed:
            found.extend(cond.anti_actions)
            if cond.brk in ("on-false", "always"):
                break
            continue
        for application, data in cond.actions:
            if match is not None and "(" in expression:  # FreeSWITCH substitutes only then
                data = _CAPTURE.sub(lambda c, m=match: _group(m, int(c[1] or c[2])), data)
            found.append((application, data))
        if cond.brk in ("on-true", "always"):
            break
    return proceed


def _group(match: re.Match, number: int) -> str:
    return (match.group(number) or "") if number <= match.re.groups else ""
