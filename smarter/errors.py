"""Errors meant for the user, as one line: ``smarter: error: ...`` and exit status 2. The parser of every
``smarter`` command reports its errors through here, so each names the key and the fix."""

from __future__ import annotations

import re
import sys
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser

PROG = "smarter"

# ---- one-line parser errors ------------------------------------------------------------------------

_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Expected a <class 'NoneType'>",
    "Problem with given class_path",
)


_TYPE_WORDS = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "a string"}


def condense_parser_error(message: str) -> str:
    """jsonargparse's nested error text as one line: the dotted key and the innermost reason. Where a union
    (a class path or a plain string, say) names a class that was found, that class's own error is the reason,
    not the other alternatives' ("Expected a <class 'str'>"). A setting given under a one-value key
    (``--model.x.y``) is pointed to its place beside it (``--model.y``)."""
    lines = message.splitlines()
    found = next((i for i, line in enumerate(lines) if "Problem with given class_path" in line), None)
    if found is not None:
        errors = [i for i, line in enumerate(lines[:found]) if line.strip() == "Errors:"]
        if errors:
            lines = lines[: errors[-1]] + lines[found:]
    keys: list[str] = []
    detail = ""
    for raw in lines:
        line = raw.strip().removeprefix("- ").strip()
        if not line or line.startswith(_NOISE):
            continue
        key = re.match(r'(?:Parser key|Key) "([^"]+)":\s*(.*)', line)
        if key:
            keys.append(key.group(1))
            if key.group(2) and not key.group(2).startswith(_NOISE):
                detail = key.group(2)
                break
            continue
        detail = line
        break
    dotted = ".".join(k for k in keys if k != "init_args")
    nested = re.search(r"Got value: NestedArg\(key='([^']+)', val=(.*)\)$", detail)
    if nested and dotted:
        return _nested_under_a_value(dotted, nested.group(1), nested.group(2), detail)
    literal = re.match(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", detail)
    if literal:
        detail = f"{literal.group(2)!r} is not one of {literal.group(1)}"
    if re.fullmatch(r"Expected a <class '\w+'>", detail):  # an optional setting: the value comes later
        start = next(i for i, line in enumerate(lines) if detail in line)
        given = [line.strip() for line in lines[start:] if line.strip().startswith("Given value: ")]
        if given:
            detail += ". Got value: " + given[0].removeprefix("Given value: ")
    simple = re.match(r"Expected a <class '(\w+)'>\. Got value: (.*)", detail)
    if simple and simple.group(1) in _TYPE_WORDS:
        detail = f"expected {_TYPE_WORDS[simple.group(1)]}, got {simple.group(2)!r}"
    text = f"{dotted}: {detail}" if dotted and detail else (detail or message.strip().splitlines()[0])
    return " ".join(text.split())


def _nested_under_a_value(dotted: str, key: str, value: str, detail: str) -> str:
    """``--model.activation_checkpointing.keep_last_layers 0``: the key takes one value, not settings; the
    setting is most likely meant beside it (the subcommand's parser cannot tell: a class's arguments are
    known only once its class path is)."""
    literal = re.match(r"Expected a typing\.Literal\[(.*)\]", detail)
    takes = f"one of {literal.group(1)}" if literal else "one value"
    text = f"{dotted} takes {takes}; it has no setting {key!r}"
    beside = f"{dotted.rpartition('.')[0]}.{key}".lstrip(".")
    given = value.strip("'")  # jsonargparse quotes the value: NestedArg(key='k', val='1')
    return f"{text} (did you mean --{beside} {given}?)"


def explain_class_path(message: str) -> str:
    """jsonargparse says only "Expected a path but X either not accessible or invalid" for a class path it
    could not import; say why: the module is not on the Python path, importing it failed, or it lacks the class."""
    import importlib

    found = re.search(r"Expected a path but (\S+) either not accessible or invalid", message)
    if found is None:
        return message
    target = found.group(1)
    module_name, _, class_name = target.rpartition(".")
    if not module_name:
        return message
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or module_name
        if not (module_name == missing or module_name.startswith(missing + ".")):  # one the module imports
            reason = f"importing {module_name} failed: {error}"
        else:
            reason = (
                f"the module {missing!r} cannot be imported: it is not installed nor on the Python path (for "
                f"{missing.split('.')[0]}.py in the current folder, run with PYTHONPATH=.)"
            )
    except Exception as error:  # the user's module itself failed to import
        reason = f"importing {module_name} failed: {type(error).__name__}: {error}"
    else:
        if hasattr(module, class_name):
            return message
        reason = f"{module_name} ({module.__file__}) has no {class_name!r}"
    return message.replace(found.group(0), f"{target}: {reason}")


class SmarterArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose errors are one line that names the key and the fix."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a nested parser: jsonargparse catches this and tries alternatives
            super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        fail(f"{explain_class_path(condense_parser_error(message))} (see `{prog} --help`)")


def fail(message: str) -> NoReturn:
    """Print ``smarter: error: message`` and exit with status 2."""
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)
