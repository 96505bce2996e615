"""Command-line flags generated from configuration dataclasses.

A field ``tensor_model_parallel_size`` becomes ``--tensor-model-parallel-size``; its help text is
the one-line docstring written under the field. ``flags`` overrides a name where Megatron-LM
spells the flag differently (``add_bias_linear`` <- ``--disable-bias-linear``, stored inverted) or
where a concern prefix is wanted (``rope_type`` <- ``--rope-scaling-type``). Nested dataclass
fields are skipped: their own flags build them. Validation stays in the dataclasses'
``__post_init__``, so the CLI cannot accept what the Python API would reject.

:class:`StrictArgumentParser` is what the generated flags are parsed with: like Megatron-LM's
parser it refuses abbreviations (``allow_abbrev=False``), it also refuses a flag given twice (the
last would silently win), and it raises ``ValueError`` instead of exiting, so entry points print
one ``error:`` line. Float flags go through :func:`finite_float`, which refuses ``inf``/``nan``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any


class StrictArgumentParser(argparse.ArgumentParser):
    """``argparse`` without its silent guesses; usage errors raise ``ValueError``.

    No prefix matching (``--lr-warm`` is not ``--lr-warmup-iters``), and each option once:
    ``--lr 1e-3 ... --lr 5`` is refused naming ``--lr`` (``--flag=value`` spellings and the
    values of ``nargs='+'`` flags are told apart by the option strings the parser knows).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:  # argparse hook: raise, do not exit
        raise ValueError(message)

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 (argparse API)
        argv = sys.argv[1:] if args is None else list(args)
        self._refuse_repeats(argv)
        return super().parse_known_args(argv, namespace)

    def _refuse_repeats(self, argv: list[str]) -> None:
        seen: dict[int, str] = {}
        for token in argv:
            if token == "--":  # everything after is positional
                break
            name = token.split("=", 1)[0] if token.startswith("--") else token
            action = self._option_string_actions.get(name)
            if action is None:
                continue
            if id(action) in seen:
                first = seen[id(action)]
                also = "" if first == name else f" (also as {first})"
                self.error(f"{name} is given more than once{also}: give each flag once")
            seen[id(action)] = name


def finite_float(text: str) -> float:
    """The ``type`` of float flags: a number, refusing ``inf`` and ``nan``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


@dataclass(frozen=True)
class Flag:
    """How one field appears on the command line."""

    name: str
    """The flag, e.g. ``--disable-bias-linear``."""
    invert: bool = False
    """For bools: the flag stores the negation of the field (``--disable-X`` sets X False)."""
    nargs: int | None = None
    """For lists: exactly this many values (default: one or more)."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (its help text)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp: Any) -> tuple[Any, bool, bool]:
    """(scalar type, is_optional, is_list) of a field annotation."""
    origin = typing.get_origin(tp)
    optional = False
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else str
        origin = typing.get_origin(tp)
    if origin in (list, tuple):
        inner = typing.get_args(tp)
        return (inner[0] if inner else str), optional, True
    return tp, optional, False


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def add_dataclass_args(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str,
    flags: dict[str, Flag] | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """Add one argument group holding a flag per field of dataclass ``cls``.

    Defaults are ``argparse.SUPPRESS`` so :func:`dataclass_from_args` can tell "not given" (keep
    the dataclass default, or a preset's value) from an explicit value.
    """
    flags = flags or {}
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name in skip or dataclasses.is_dataclass(tp) or not f.init:
            continue
        flag = flags.get(f.name, Flag("--" + f.name.replace("_", "-")))
        default = _default_of(f)
        help_text = f"{docs.get(f.name, '')} (default: {default!r})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        scalar, _, is_list = _base_type(tp)
        if scalar is bool and not is_list:
            store_true = not flag.invert
            group.add_argument(
                flag.name, action="store_true" if store_true else "store_false", **kwargs
            )
            continue
        if is_list:
            kwargs["nargs"] = flag.nargs or "+"
        cast = {int: int, float: finite_float}.get(scalar, str)
        group.add_argument(flag.name, type=cast, **kwargs)


def dataclass_from_args(cls: type, args: argparse.Namespace, base: Any = None, **extra: Any):
    """Build ``cls`` from the flags that were given, on top of ``base`` (or the defaults).

    Args:
        cls: the dataclass.
        args: parsed namespace (fields not given on the command line are absent from it).
        base: an instance whose values stand where a flag was not given (e.g. a model preset).
        **extra: values for fields without flags (nested dataclasses).
    """
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in extra:
            values[f.name] = extra[f.name]
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
        elif base is not None:
            values[f.name] = getattr(base, f.name)
    return cls(**values)


def given_flags(args: argparse.Namespace, cls: type) -> set[str]:
    """Names of ``cls``'s fields that were set explicitly on the command line."""
    return {f.name for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def run_tool(action: Callable[[], Any], errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command-line tool's work; map failures to one ``error:`` line and an exit status.

    Returns 0 after printing the result (its ``summary()`` when it has one); 2 on a user error
    (``ValueError``, ``OSError`` and ``errors``), with no traceback; 130 when interrupted
    (outputs are written atomically, so nothing partial is left).
    """
    try:
        result = action()
    except (ValueError, OSError, *errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output written", file=sys.stderr)
        return 130
    print(result.summary() if hasattr(result, "summary") else result)
    return 0


def parse_csv(text: str, flag: str, cast: type) -> list:
    """``"a,b"`` -> ``[cast(a), cast(b)]``; ValueError naming ``flag`` when bad or empty."""
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"{flag} {text!r}: expected comma-separated values") from err
    if not values:
        raise ValueError(f"{flag} {text!r}: must not be empty")
    return values


def format_duration(seconds: float) -> str:
    """``3725`` -> ``'1h02m05s'``; ``'?'`` for a non-finite value."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
