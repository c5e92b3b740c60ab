"""The Jinja environment chat templates run in: transformers' environment, plus limits.

A template read from a GGUF or a file is untrusted code. transformers renders it in an
ImmutableSandboxedEnvironment (no `__class__`-style escapes, no mutation of lists/dicts); this
module builds the same environment (same options, filters and globals, so output is
byte-identical) and adds what the sandbox lacks: a render deadline and a size bound on the
output and on every string or list the template builds.

How the deadline is enforced without signals (rendering may run in any thread): every for-loop
iterable is rewritten at parse time to pass through a checking iterator, and every call,
attribute/item access, filter and test checks the clock. Jinja has no while loop, so any long
render goes through one of those. Operations that could allocate a huge value in a single
C call (`*`, `**`, `%`, `+`, padding widths, replace, indent, join) are checked before they run,
and the total size of all values a render builds is bounded too.

Not covered: a single C-level call on a value within the bounds that is slow by itself (e.g.
sorting or word-wrapping a multi-megabyte value) runs to its end before the clock is read.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Iterator

import jinja2
import jinja2.ext
import jinja2.nodes as nodes
import jinja2.utils
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg, pass_context

from .. import constants
from ..errors import TemplateError

_MIN_JINJA = (3, 1, 6)  # older releases have known sandbox escapes (transformers refuses them too)
# A number this long in a format spec pads to at least a million characters.
_HUGE_FORMAT_WIDTH = re.compile(r"\d{7,}")
_CHECK_EVERY = 64  # loop iterations between clock reads
# Everything a render builds (garbage included) may total this many times the output bound:
# stops a loop that keeps making big values faster than the clock check can notice.
_ALLOCATION_FACTOR = 16


@dataclass
class _Limits:
    deadline: float
    max_chars: int
    ticks: int = 0
    built: int = 0


_LIMITS: contextvars.ContextVar[_Limits | None] = contextvars.ContextVar("qwq_template_limits", default=None)


class TemplateLimitError(TemplateError):
    """A template ran too long or built too much text (raised from inside rendering)."""


def _max_chars() -> int:
    limits = _LIMITS.get()
    return limits.max_chars if limits else constants.TEMPLATE_MAX_CHARS


def _check_time() -> None:
    limits = _LIMITS.get()
    if limits is not None and time.monotonic() > limits.deadline:
        raise TemplateLimitError(
            "the chat template ran past its time limit (an endless or huge loop?); "
            "use template='original' or fix the template"
        )


def _too_big(what: str) -> TemplateLimitError:
    return TemplateLimitError(
        f"the chat template tried to build {what} over {_max_chars():,} characters; "
        "use template='original' or fix the template"
    )


def deep_size(value: Any, budget: int) -> int:
    """Approximate length of str(value), counting shared references again each time (which is
    what str() does); stops counting past `budget`."""
    total, stack = 0, [value]
    while stack and total <= budget:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item) + 4
        elif isinstance(item, dict):
            total += 2 + 2 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(item)
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            total += item.bit_length() // 3 + 1
        else:
            total += 8
    return total


def _check_size(value: Any, what: str = "a value") -> Any:
    if isinstance(value, (str, list, tuple, dict)):
        if len(value) > _max_chars():
            raise _too_big(what)
        limits = _LIMITS.get()
        if limits is not None:
            limits.built += len(value)
            if limits.built > limits.max_chars * _ALLOCATION_FACTOR:
                raise TemplateLimitError(
                    f"the chat template built over {limits.built:,} characters of values in total; "
                    "use template='original' or fix the template"
                )
    return value


def _check_deep(value: Any, what: str) -> None:
    limit = _max_chars()
    if not isinstance(value, str) and deep_size(value, limit) > limit:
        raise _too_big(what)
    if isinstance(value, str) and len(value) > limit:
        raise _too_big(what)


def _check_int_args(args: Iterable[Any], name: str) -> None:
    limit = _max_chars()
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > limit:
            raise _too_big(f"something from {name}() (argument {arg})")


def _estimate_replace(s: str, old: Any, new: Any) -> int:
    if not (isinstance(old, str) and isinstance(new, str)):
        return len(s)
    hits = len(s) + 1 if old == "" else s.count(old)
    return len(s) + hits * max(0, len(new) - len(old))


def _precheck_filter(name: str, args: tuple, kwargs: dict) -> None:
    _check_int_args([*args, *kwargs.values()], name)
    if not args:
        return
    value = args[0]
    if name in {"tojson", "string", "pprint", "join", "format", "sum", "center", "wordwrap",
                "urlize", "indent", "replace", "xmlattr"}:
        _check_deep(value, f"the input of |{name}")
    if name == "format" and isinstance(value, str) and _HUGE_FORMAT_WIDTH.search(value):
        raise _too_big("a formatted string")
    if name == "replace" and isinstance(value, str) and len(args) >= 3:
        if _estimate_replace(value, args[1], args[2]) > _max_chars():
            raise _too_big("a string with |replace")
    if name == "indent" and isinstance(value, str):
        width = args[1] if len(args) > 1 else kwargs.get("width", 4)
        width_len = len(width) if isinstance(width, str) else int(width or 0)
        if len(value) + (value.count("\n") + 1) * width_len > _max_chars():
            raise _too_big("a string with |indent")


def _guard_filter(name: str, func: Any) -> Any:
    """Wrap a filter or test so it checks the clock and sizes. Wrapping with pass_context also
    stops Jinja from running it at compile time (constant folding), outside the limits."""
    pass_arg = _PassArg.from_obj(func)

    @pass_context
    def guarded(context: Any, *args: Any, **kwargs: Any) -> Any:
        _check_time()
        _precheck_filter(name, args, kwargs)
        if pass_arg is _PassArg.context:
            result = func(context, *args, **kwargs)
        elif pass_arg is _PassArg.eval_context:
            result = func(context.eval_ctx, *args, **kwargs)
        elif pass_arg is _PassArg.environment:
            result = func(context.environment, *args, **kwargs)
        else:
            result = func(*args, **kwargs)
        return _check_size(result, f"the result of |{name}")

    return functools.update_wrapper(guarded, func, assigned=("__name__", "__doc__"), updated=())


def _checked_binop(operator: str, left: Any, right: Any) -> None:
    limit = _max_chars()
    sized = (str, list, tuple)
    if operator == "*":
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, sized) and isinstance(count, int) and len(seq) * max(count, 0) > limit:
                raise _too_big("a repeated string or list")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 65536:
            raise _too_big("a number")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0:
            if max(left.bit_length(), 1) * right > 65536:
                raise _too_big("a number")
    elif operator == "+":
        if isinstance(left, sized) and isinstance(right, sized) and len(left) + len(right) > limit:
            raise _too_big("a concatenated string or list")
    elif operator == "%" and isinstance(left, str):
        if _HUGE_FORMAT_WIDTH.search(left):
            raise _too_big("a formatted string")
        _check_deep(right, "the arguments of %")


class _Guard(jinja2.ext.Extension):
    """Holds the helpers the parse-time rewrite calls (For iterables, `~` concatenation)."""

    def bounded_iter(self, iterable: Any) -> Iterator[Any]:
        return _bounded_iter(iterable)

    def concat(self, parts: list) -> str:
        for part in parts:
            _check_deep(part, "a string with ~")
        result = "".join(map(str, parts))
        return _check_size(result, "a string with ~")


_GUARD_ID = f"{_Guard.__module__}.{_Guard.__name__}"


def _bounded_iter(iterable: Any) -> Iterator[Any]:
    limits = _LIMITS.get()
    for item in iterable:
        if limits is not None:
            limits.ticks += 1
            if limits.ticks % _CHECK_EVERY == 0:
                _check_time()
        yield item


def _guard_call(method: str, arg: nodes.Expr, lineno: int) -> nodes.Call:
    call = nodes.Call(nodes.ExtensionAttribute(_GUARD_ID, method), [arg], [], None, None)
    return call.set_lineno(lineno)


def _rewrite(node: nodes.Node) -> nodes.Node:
    """Route for-loop iterables and `~` through _Guard (see the module docstring)."""
    for field in node.fields:
        value = getattr(node, field, None)
        if isinstance(value, nodes.Node):
            setattr(node, field, _rewrite(value))
        elif isinstance(value, list):
            setattr(node, field, [_rewrite(v) if isinstance(v, nodes.Node) else v for v in value])
    if isinstance(node, nodes.For):
        node.iter = _guard_call("bounded_iter", node.iter, node.lineno)
    if isinstance(node, nodes.Concat):
        return _guard_call("concat", nodes.List(node.nodes, lineno=node.lineno), node.lineno)
    return node


def _guarded_concat(parts: Iterable[str]) -> str:
    parts = list(parts)
    if sum(len(p) for p in parts) > _max_chars():
        raise _too_big("a captured block")
    return "".join(parts)


def _finalize(value: Any) -> Any:
    _check_deep(value, "an output expression")
    return value


class GuardedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    # Called for `{% set %}` blocks and macro bodies: bound the joined size before joining.
    concat = staticmethod(_guarded_concat)  # type: ignore[assignment]

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        tree = _rewrite(tree)
        tree.set_environment(self)
        return tree  # type: ignore[return-value]

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # The stock sandbox returns a silent Undefined for a blocked attribute; an untrusted
        # template probing `__class__` & co. is an attack, so it fails loudly instead.
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed"
        )

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_time()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_time()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_time()
        _checked_binop(operator, left, right)
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _check_time()
        name = getattr(__obj, "__name__", type(__obj).__name__)
        _check_int_args([*args, *kwargs.values()], name)
        if isinstance(__obj, LoopContext) and args:
            # `loop(children)` in a recursive for-loop iterates outside the rewritten node.
            args = (_bounded_iter(args[0]), *args[1:])
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        if isinstance(owner, str):
            args = _precheck_str_method(owner, name, args)
        return _check_size(super().call(__context, __obj, *args, **kwargs), f"the result of {name}()")


def _precheck_str_method(owner: str, name: str, args: tuple) -> tuple:
    if name in {"format", "format_map"}:
        if _HUGE_FORMAT_WIDTH.search(owner):
            raise _too_big("a formatted string")
        for arg in args:
            _check_deep(arg, "the arguments of format()")
    elif name == "replace" and len(args) >= 2:
        if _estimate_replace(owner, args[0], args[1]) > _max_chars():
            raise _too_big("a string with replace()")
    elif name == "expandtabs":
        width = args[0] if args else 8
        if isinstance(width, int) and len(owner) + owner.count("\t") * width > _max_chars():
            raise _too_big("a string with expandtabs()")
    elif name == "join" and args:
        items = list(_bounded_iter(args[0]))
        if sum(len(i) if isinstance(i, str) else 0 for i in items) + len(owner) * len(items) > _max_chars():
            raise _too_big("a string with join()")
        args = (items, *args[1:])
    return args


# --- transformers' template globals and filters (chat_template_utils._compile_jinja_template) --

def _raise_exception(message: Any) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers overrides Jinja's tojson: no HTML escaping, non-ASCII kept, options exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 (transformers' parameter name)
    return datetime.now().strftime(format)


class _TemplateDict:
    # A callable stand-in for `dict` that exposes nothing else of the type.
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Namespaces reject underscore names so templates cannot reach CPython internals.
    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (Jinja's signature trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}"
            )


class _GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %}` tag (marks assistant text for training masks); when
    rendering a prompt it only outputs its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def jinja_version_ok() -> bool:
    parts = tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])
    return parts >= _MIN_JINJA


@functools.lru_cache(maxsize=1)
def environment() -> GuardedEnvironment:
    if not jinja_version_ok():
        raise TemplateError(
            f"jinja2 {jinja2.__version__} has known sandbox escapes; upgrade it: pip install -U 'jinja2>=3.1.6'"
        )
    env = GuardedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols, _Guard],
        finalize=_finalize,
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.tests = {name: _guard_filter(name, f) for name, f in env.tests.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def render_limited(template: jinja2.Template, variables: dict, *, timeout_s: float, max_chars: int) -> str:
    """Render under the deadline and size bound; raises TemplateLimitError past either."""
    token = _LIMITS.set(_Limits(deadline=time.monotonic() + timeout_s, max_chars=max_chars))
    try:
        parts, total = [], 0
        for chunk in template.root_render_func(template.new_context(variables)):
            total += len(chunk)
            if total > max_chars:
                raise _too_big("a prompt")
            parts.append(chunk)
            _check_time()
        return "".join(parts)
    finally:
        _LIMITS.reset(token)
