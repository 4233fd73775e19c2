"""A configuration file's text to a raw mapping: safe YAML, careful errors, variables.

:mod:`proxy.config` validates what comes out of here. Two things in this module are about
trust rather than parsing:

* A file that is not valid YAML gets a one-line error from the parser's problem and its
  position only. PyYAML's own message also prints the lines around the problem, and a
  configuration file holds secrets. What the problem text itself quotes (an alias or a
  tag name, a character) is kept only when it is a single character that is no letter
  or digit: the one that broke the syntax, which tells nothing of a secret.
* ``${NAME}`` and ``${NAME:-fallback}`` are replaced by environment variables as in sh,
  Docker Compose and Kubernetes; ``$${`` writes a literal ``${``, and every other ``$``
  stands for itself (``pa$$word``, ``$5``). A ``${`` that does not parse is an error that
  names the key and, where it can be read, the variable: it is far more likely a broken
  reference to a secret than a secret, and must not be sent to bol as one.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from typing import Any

import yaml

from .errors import ConfigError

# libyaml's loader where installed: 10,000 credential sets load five times faster.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STANDARD_TAG = "tag:yaml.org,2002:"
_KINDS = frozenset({"int", "float", "bool", "null", "timestamp", "binary", "str", "set",
                    "omap", "pairs", "seq", "map"})


class DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping names one key twice: YAML would silently keep the last one."""


class _Loader(_SafeLoader):  # type: ignore[misc,valid-type]
    """A safe loader that refuses duplicate keys (a copied credential set that reuses a
    name must not quietly replace the first one) and gives a value that its type cannot
    hold a position, as every other YAML error has."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor": keys given beside it override what it merges
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: the base class says so
            if duplicate:
                raise DuplicateKey(None, None, f"duplicate key '{str(key)[:64]}'",
                                   key_node.start_mark)
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except Exception:
            # PyYAML's constructors fail with bare ValueError, KeyError or AttributeError
            # (a date such as 2024-13-45, "!!float abc"), whose text quotes the value and
            # which carry no position. The innermost node is the one that failed.
            tag = str(node.tag)
            kind = tag[len(_STANDARD_TAG):] if tag.startswith(_STANDARD_TAG) else ""
            article = "an" if kind[:1] in ("i", "o") else "a"  # an int, an omap
            what = f"{article} {kind}" if kind in _KINDS else "its type"
            raise yaml.constructor.ConstructorError(
                None, None, f"this value cannot be read as {what}; quote it to keep it as text",
                node.start_mark) from None


def parse(text: str, source: str) -> Any:
    """The YAML document in ``text``, or :class:`ConfigError` naming ``source`` and where
    in it the problem is, without quoting the file."""
    try:
        return yaml.load(text, Loader=_Loader)  # a safe loader: CSafeLoader or SafeLoader
    except DuplicateKey as exc:
        line = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark else ""
        raise ConfigError(f"{source}: {exc.problem}{line}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {describe(exc, text)}") from None


# A quoted part of a problem text, as PyYAML writes it with %r.
_QUOTED = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\"""")
_TOKEN_KIND = re.compile(r"'<[a-z ]+>'")  # the parser's names of token kinds: '<stream end>'
NOT_SHOWN = "(not shown)"


def describe(exc: yaml.YAMLError, text: str) -> str:
    """One line for a YAML error in ``text``: where and what, from the problem text and
    its position only, never from the file's lines (``context`` and the snippet quote
    them)."""
    if isinstance(exc, yaml.reader.ReaderError):
        # A character YAML does not allow at all (a control character): name its code
        # point, and find it ourselves, as the two loaders count its position differently.
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        index = text.find(chr(code))
        where = f"{_position(text, index)}: " if index >= 0 else ""
        return f"{where}character U+{code:04X} is not allowed"
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "the file is not a YAML document"
    if problem == "found character that cannot start any token" and mark is not None:
        # libyaml leaves the character out of this message; PyYAML names it ('\t', '@').
        index = getattr(mark, "index", -1)
        if 0 <= index < len(text):
            problem = f"found character {text[index]!r} that cannot start any token"
    elif problem == "second occurrence":  # the rest of it is in the context
        problem = "an anchor (&name) defined a second time"
    problem = " ".join(_QUOTED.sub(_quoted, problem).split())[:200]
    if mark is None:
        return problem
    if "'}'" in problem and "${" in _line(text, mark.line):
        # {client_id: ${ACME_ID}}: in a { } mapping, "{" of "${" opens another one.
        problem += " (inside { }, put a value that holds ${...} in quotes)"
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _line(text: str, number: int) -> str:
    """Line ``number`` (0-based) of ``text``; only looked at, never shown."""
    lines = text.splitlines()
    return lines[number] if 0 <= number < len(lines) else ""


def _quoted(match: re.Match[str]) -> str:
    """A quote from a problem text, if it cannot be part of a secret; else NOT_SHOWN."""
    quoted = match.group()
    if _TOKEN_KIND.fullmatch(quoted):
        return quoted
    try:
        inner = ast.literal_eval(quoted)
    except (ValueError, SyntaxError):
        return NOT_SHOWN
    # An alias, anchor or tag name, or a letter after a backslash, may be a secret's
    # text (an unquoted value that starts with '*' or '!' is read as an alias or a tag).
    # One character that is no letter or digit is the syntax that broke: a tab, an '@'.
    if isinstance(inner, str) and len(inner) == 1 and not inner.isalnum():
        return quoted
    return NOT_SHOWN


def _position(text: str, index: int) -> str:
    line = text.count("\n", 0, index) + 1
    column = index - text.rfind("\n", 0, index)  # rfind is -1 on the first line
    return f"line {line}, column {column}"


# ------------------------------------------------------------------------ variables

# "$${" (a literal "${"), or "${" up to the next "}" (which may be missing).
_REFERENCE = re.compile(r"\$\$\{|\$\{(?P<inside>[^}]*)(?P<close>\}?)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}(?![A-Za-z0-9_])")
_FORM = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<fallback>.*))?", re.DOTALL)
_LITERAL_HINT = "write $${ for a literal ${"


def interpolate(value: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Replace ``${NAME}`` and ``${NAME:-fallback}`` in every string of ``value``;
    ``$${`` becomes ``${``. ``path`` is the key path of ``value``, for errors."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{path}.{k}" if path else str(k))
                for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group() == "$${":
            return "${"
        inside = match["inside"]
        form = _FORM.fullmatch(inside)
        if not match["close"] or form is None or "${" in (form["fallback"] or ""):
            raise ConfigError(f"{path}: {_broken(inside, bool(match['close']))}; "
                              f"{_LITERAL_HINT}")
        name, fallback = form["name"], form["fallback"]
        # As in sh, Compose and Kubernetes: ":-" also covers a variable set to "".
        if fallback is not None and not env.get(name):
            return str(fallback)
        if name in env:
            return env[name]
        raise ConfigError(f"{path}: environment variable {name} is not set")

    # Substituted text is not scanned again: a variable's value may hold "${".
    return _REFERENCE.sub(substitute, value)


def _broken(inside: str, closed: bool) -> str:
    """What is wrong with ``${inside}``, naming the variable if one can be read; the rest
    of the value is never shown."""
    named = _NAME.match(inside)
    if named is None:
        if not inside:
            return "'${}' names no variable" if closed else "the value ends in '${'"
        return ("'${' is not followed by a variable name (letters, digits and _, not "
                "starting with a digit)")
    name = named.group()
    if not closed:
        return f"the reference to variable {name} has no closing '}}'"
    if "${" in inside:
        return f"the fallback of variable {name} holds another '${{': nesting is not supported"
    return f"after variable {name}, expected '}}' or ':-fallback}}'"
