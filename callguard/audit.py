"""The SIP secrets of a PBX against the seed's password policy.

A cracked extension is how a PBX ends up phoning premium numbers on 30 channels; the
limits only cap the damage. The policy (Winet's, for its customers' telephone systems):
at least 9 characters, at least three of upper case, lower case, digits and specials, no
ordered sequence (`1234`, `abcd`, `qwertz`, either way) and no run of one character (4 or
more of either), and not the user name.

Read: Asterisk pjsip.conf (type=auth sections, the pjsip wizard's `inbound_auth/` and
`outbound_auth/`, templates, `#include`) and FreeSWITCH directory XML (the `password` and
`reverse-auth-pass` params of a user, its group's or domain's, `$${var}` set in vars.xml,
`X-PRE-PROCESS` includes). A secret's text never leaves this module: a failure names the
file, line, user and the rules it breaks, nothing of the value, not even its first letter.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

MIN_LENGTH = 9
MIN_CLASSES = 3
RUN = 4  # an ordered sequence, or one character repeated, this long breaks the policy
MIN_USER = 3  # a shorter user name is not looked for in its secret: "10" is in too much

RULES = ("too_short", "too_few_classes", "sequence", "repeated", "contains_user",
         "unresolved_variable")

# Digits, the alphabet and the keyboard rows, US (qwerty) and Swiss/German (qwertz).
_ROWS = ("0123456789", "abcdefghijklmnopqrstuvwxyz", "1234567890", "qwertyuiop", "asdfghjkl",
         "zxcvbnm", "qwertzuiop", "yxcvbnm")
_SEQUENCES = frozenset(row[i:i + RUN] for r in _ROWS for row in (r, r[::-1])
                       for i in range(len(row) - RUN + 1))
_REPEAT = re.compile(rf"(.)\1{{{RUN - 1}}}", re.S)
_VARIABLE = re.compile(r"\$\$\{([^}]*)\}")


class AuditError(Exception):
    """Input that cannot be read or is refused: the audit stops (exit 2)."""


def check(secret: str, user: str = "") -> dict[str, str]:
    """The rules `secret` breaks, each with a detail that gives nothing of it away."""
    broken = {}
    if len(secret) < MIN_LENGTH:
        broken["too_short"] = f"{len(secret)} < {MIN_LENGTH}"
    kinds = (str.isupper, str.islower, str.isdigit, lambda c: not c.isalnum())
    classes = sum(any(kind(c) for c in secret) for kind in kinds)
    if classes < MIN_CLASSES:
        broken["too_few_classes"] = f"{classes} of 4 kinds, needs {MIN_CLASSES}"
    low = secret.lower()
    if any(low[i:i + RUN] in _SEQUENCES for i in range(len(low) - RUN + 1)):
        broken["sequence"] = ""
    if _REPEAT.search(low):
        broken["repeated"] = ""
    if len(user) >= MIN_USER and user.lower() in low:
        broken["contains_user"] = ""
    return broken


@dataclass(frozen=True)
class Secret:
    """Where a SIP secret is set; `section`: the pjsip section, or the FreeSWITCH param."""

    file: str
    line: int
    user: str
    section: str
    value: str = field(repr=False)  # never printed, logged or returned


@dataclass(frozen=True)
class Failure:
    file: str
    line: int
    user: str
    section: str
    broken: dict[str, str]  # rule -> detail ("" for none)

    def as_json(self) -> dict:
        return {"file": self.file, "line": self.line, "user": self.user,
                "section": self.section, "rules": list(self.broken),
                "details": {k: v for k, v in self.broken.items() if v}}

    def text(self) -> str:
        rules = ", ".join(f"{k} ({v})" if v else k for k, v in self.broken.items())
        return f"{self.file}:{self.line} {self.user}: breaks {rules}"


@dataclass
class Report:
    failures: list[Failure]
    checked: int  # secrets
    files: list[str]  # read
    notes: list[str]  # what was skipped and why


def audit(paths: list[str]) -> Report:
    """Read every path (a file, or a folder of pjsip*.conf and *.xml) and check its secrets."""
    reader = _Reader()
    for path in paths:
        reader.path(Path(path))
    failures, seen = [], set()
    for s in reader.secrets:
        # A file read twice (a folder's walk, an include) has its secrets once.
        key = (os.path.realpath(s.file), s.line, s.user, s.section)
        if key in seen:
            continue
        seen.add(key)
        unresolved = [n for n in _VARIABLE.findall(s.value) if n not in reader.variables]
        if unresolved:
            broken = {"unresolved_variable": ", ".join(f"$${{{n}}}" for n in unresolved)}
        else:
            value = _VARIABLE.sub(lambda m: reader.variables[m.group(1)], s.value)
            broken = check(value, s.user)
        if broken:
            failures.append(Failure(s.file, s.line, s.user, s.section, broken))
    order = {name: i for i, name in enumerate(reader.files.values())}
    failures.sort(key=lambda f: (order.get(f.file, len(order)), f.line))
    return Report(failures, len(seen), list(reader.files.values()), reader.notes)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read {path}: {exc.strerror or exc}") from None


def _is_xml(path: Path) -> bool:
    if path.suffix.lower() == ".xml":
        return True
    return _read(path).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")


@dataclass
class _Category:
    name: str
    file: str
    line: int
    template: bool
    values: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # (value, file, line)


class _Reader:
    def __init__(self):
        self.secrets: list[Secret] = []
        self.notes: list[str] = []
        self.files: dict[str, str] = {}  # real path -> as named
        self.variables: dict[str, str] = {}  # FreeSWITCH $${...}

    def _opened(self, path: Path) -> None:
        self.files.setdefault(os.path.realpath(path), str(path))

    def path(self, path: Path) -> None:
        if not path.exists():
            raise AuditError(f"cannot read {path}: no such file or directory")
        if not path.is_dir():
            if _is_xml(path):
                self._vars_above(path.parent)
                self.xml(path)
            else:
                self.conf(path)
            return
        found = self._walk(path)
        confs = [p for p in found if p.name.startswith("pjsip") and p.suffix == ".conf"]
        xmls = [p for p in found if p.suffix.lower() == ".xml"]
        if not confs and not xmls:
            raise AuditError(f"nothing to audit in {path}: no pjsip*.conf, no *.xml")
        # pjsip.conf first: the files it includes are read with its templates.
        for conf in sorted(confs, key=lambda p: (p.name != "pjsip.conf", p)):
            if os.path.realpath(conf) not in self.files:
                self.conf(conf)
        if xmls:
            self._vars_above(path)
        for xml in xmls:
            self.xml(xml)

    @staticmethod
    def _walk(folder: Path) -> list[Path]:
        def fail(exc):
            raise AuditError(f"cannot read {exc.filename}: {exc.strerror}")

        return sorted(Path(d) / f for d, _, files in os.walk(folder, onerror=fail)
                      for f in files)

    # -- Asterisk ---------------------------------------------------------------------
    def conf(self, top: Path) -> None:
        """One pjsip configuration as Asterisk loads it: the included files' lines go on
        in the section open where the #include is, a template counts where it is used."""
        categories: list[_Category] = []
        named: dict[str, _Category] = {}  # the last one of a name
        current = None
        for file, number, line in self._conf_lines(top, top.parent, (os.path.realpath(top),)):
            header = _HEADER.fullmatch(line)
            if header:
                current = self._category(categories, named, header, file, number)
                continue
            pair = _PAIR.fullmatch(line)
            if pair and current is not None:
                current.values[pair.group(1).strip().lower()] = (pair.group(2).strip(), file,
                                                                 number)
        for cat in categories:
            kind = cat.values.get("type", ("",))[0].lower()
            if cat.template:
                continue
            if kind == "auth":
                self._auth(cat, "")
            elif kind == "wizard":
                for side in ("inbound_auth/", "outbound_auth/"):
                    if side + "password" in cat.values:
                        self._auth(cat, side)

    def _category(self, categories: list, named: dict, header, file: str,
                  number: int) -> _Category:
        """A `[name]`, `[name](!)` (a template), `[name](tmpl,...)` (the templates'
        settings first) or `[name](+)` (more of an earlier one) header."""
        name, options = header.group(1).strip(), (header.group(2) or "").split(",")
        options = [o.strip() for o in options if o.strip()]
        if "+" in options and name in named:
            return named[name]
        cat = _Category(name, file, number, "!" in options)
        for template in (o for o in options if o not in ("!", "+")):
            if template in named:
                cat.values.update(named[template].values)
            else:
                self.notes.append(f"{file}:{number} [{name}]: template {template} is not "
                                  "defined before it (Asterisk refuses the file)")
        categories.append(cat)
        named[name] = cat
        return cat

    def _auth(self, cat: _Category, side: str) -> None:
        def value(key):
            return cat.values.get(side + key, ("",))[0]

        auth_type = value("auth_type").lower() or "userpass"
        user = value("username") or cat.name
        where = f"{cat.file}:{cat.line} [{cat.name}]"
        if auth_type not in ("userpass", "digest"):  # md5 (an md5_cred), oauth
            self.notes.append(f"{where}: auth_type={auth_type}: no password to check")
        elif side + "password" in cat.values:
            secret, file, number = cat.values[side + "password"]
            self.secrets.append(Secret(file, number, user, cat.name, secret))
        elif value("md5_cred") or value("password_digest"):
            self.notes.append(f"{where}: a hash (md5_cred, password_digest), no password "
                              "to check")
        else:  # Asterisk takes it as an empty password
            self.secrets.append(Secret(cat.file, cat.line, user, cat.name, ""))

    def _conf_lines(self, path: Path, root: Path, chain: tuple) -> Iterator[tuple]:
        """(file, line number, line) without comments, #include'd files in their place."""
        text = _read(path).decode("utf-8", "surrogateescape")
        self._opened(path)
        depth = 0
        for number, raw in enumerate(text.splitlines(), 1):
            line, depth = _uncomment(raw, depth)
            directive = _DIRECTIVE.fullmatch(line)
            if not directive:
                if line:
                    yield str(path), number, line
                continue
            word, target = directive.group(1).lower(), directive.group(2).strip().strip('"<>')
            where = f"{path}:{number}"
            if word == "exec":
                self.notes.append(f"{where}: #exec not run: what it prints is not audited")
                continue
            targets = _include_targets(target, path.parent, root)
            if not targets and word == "include":
                if _is_glob(target):
                    self.notes.append(f"{where}: #include {target} matches no file")
                    continue
                raise AuditError(f"{where}: #include {target}: no such file")
            for included in targets:
                real = os.path.realpath(included)
                if real in chain:
                    self.notes.append(f"{where}: #include {target} is an include cycle: "
                                      "not read again")
                    continue
                yield from self._conf_lines(included, root, (*chain, real))

    # -- FreeSWITCH -------------------------------------------------------------------
    def _vars_above(self, start: Path) -> None:
        """The vars.xml of the configuration a directory file or folder belongs to."""
        start = start.resolve()
        for folder in (start, *start.parents):
            if (folder / "vars.xml").is_file():
                self.xml(folder / "vars.xml")
                return

    def xml(self, path: Path, stack: list | None = None, chain: tuple = ()) -> None:
        """A directory XML file; `stack`: the elements open where it is included."""
        data = _read(path)
        self._opened(path)
        chain = (*chain, os.path.realpath(path))
        stack = [] if stack is None else stack
        parser = expat.ParserCreate()

        def refuse(*_):
            raise AuditError(f"{path}: refused: it declares a DOCTYPE or an ENTITY "
                             "(not expanded, to be safe)")

        def start(tag, attrs):
            line = parser.CurrentLineNumber
            if tag == "X-PRE-PROCESS":
                self._preprocess(path, line, attrs, stack, chain)
            elif tag == "param" and len(stack) >= 2 and stack[-1]["tag"] == "params":
                name = attrs.get("name", "").lower()
                stack[-2]["params"][name] = (attrs.get("value", ""), str(path), line)
            stack.append({"tag": tag, "attrs": attrs, "line": line, "params": {}})

        def end(tag):
            element = stack.pop()
            if tag == "user":
                self._user(path, element, stack)

        parser.StartDoctypeDeclHandler = refuse
        parser.EntityDeclHandler = refuse
        parser.StartElementHandler = start
        parser.EndElementHandler = end
        try:
            parser.Parse(data, True)
        except expat.ExpatError as exc:
            raise AuditError(f"{path}: not well-formed XML: {expat.ErrorString(exc.code)} "
                             f"(line {exc.lineno})") from None

    def _preprocess(self, path: Path, line: int, attrs: dict, stack: list, chain: tuple):
        cmd, data = attrs.get("cmd", ""), attrs.get("data", "")
        if cmd == "set" and "=" in data:
            name, _, value = data.partition("=")
            self.variables[name.strip()] = _VARIABLE.sub(
                lambda m: self.variables.get(m.group(1), m.group(0)), value)
        elif cmd == "include":
            for included in _include_targets(data, path.parent, path.parent):
                if os.path.realpath(included) in chain:
                    self.notes.append(f"{path}:{line}: include {data} is an include cycle: "
                                      "not read again")
                elif included.suffix.lower() == ".xml":
                    self.xml(included, stack, chain)

    def _user(self, path: Path, user: dict, ancestors: list) -> None:
        """A user's secrets: its own params, else its group's, else its domain's."""
        if user["attrs"].get("type") == "pointer":
            return
        scopes = [user] + [e for e in reversed(ancestors) if e["tag"] in ("group", "domain")]

        def param(name):
            return next((s["params"][name] for s in scopes if name in s["params"]), None)

        uid = user["attrs"].get("id", "")
        for name, login in (("password", uid), ("reverse-auth-pass",
                                                (param("reverse-auth-user") or (uid,))[0])):
            found = param(name)
            if found is not None:
                value, file, line = found
                self.secrets.append(Secret(file, line, login or uid, name, value))
        if param("password") is None and param("a1-hash") is not None:
            self.notes.append(f"{path}:{user['line']} user {uid}: a1-hash, no password "
                              "to check")


_HEADER = re.compile(r"\[([^\]]+)\]\s*(?:\(([^)]*)\))?")
_PAIR = re.compile(r"([^=]+)=>?(.*)")
_DIRECTIVE = re.compile(r"#\s*(include|tryinclude|exec)\s*(.*)", re.I)


def _uncomment(line: str, depth: int) -> tuple[str, int]:
    """A line without its `;` comment, `\\;` as `;`; `depth`: the `;-- --;` blocks open."""
    out, i = [], 0
    while i < len(line):
        if line.startswith(";--", i):
            depth, i = depth + 1, i + 3
        elif depth and line.startswith("--;", i):
            depth, i = depth - 1, i + 3
        elif depth:
            i += 1
        elif line.startswith("\\;", i):
            out.append(";")
            i += 2
        elif line[i] == ";":
            break
        else:
            out.append(line[i])
            i += 1
    return "".join(out).strip(), depth


def _include_targets(target: str, here: Path, root: Path) -> list[Path]:
    """The files an include names, a glob allowed. A relative name: Asterisk looks in its
    configuration folder (where the top file is), which is also tried next to the file
    that includes it (the same folder unless that file is in a subfolder)."""
    if not target:
        return []
    for base in dict.fromkeys([root, here]):
        matches = [Path(m) for m in sorted(glob.glob(str(base / target)))]
        if matches:  # a folder a glob matches is skipped; one named is an error when read
            return [m for m in matches if not (_is_glob(target) and m.is_dir())]
    return []


def _is_glob(target: str) -> bool:
    return any(c in target for c in "*?[")
