"""Chat templates rendered under a budget: what `pvq generate --chat` and `pvq chat` use.

A chat template is a Jinja program that comes with the checkpoint, so it is untrusted:
transformers renders it in Jinja's immutable sandbox (no attribute escapes, no mutation of
lists and dicts), but the sandbox bounds neither time nor memory: a template that loops
10^10 times never returns, and one that doubles a string 40 times fills the memory.
`render_chat` renders it with transformers' own environment (its filters, globals and
extensions, hence the same text) in a sandbox subclass that also:

* charges every loop iteration, call, filter and intercepted operator to a budget of steps
  and a wall-clock deadline (loops are counted by rewriting each ``for`` to iterate through
  a counting filter; recursive ``loop(...)`` calls are counted in `call`);
* checks the size of every value a call, a filter, an operator, a ``~`` concatenation or a
  list, tuple or dict literal builds, and of every piece of output (also in macros and
  ``{% set %}`` blocks), against a per-value and a cumulative limit, estimating the size
  *before* the operations that can build a large value from small inputs (``*``, ``**``, ``%``, ``replace``, ``join``,
  ``center``, ``indent``, ``format``, ...), so the limit also bounds the memory.

Every failure (syntax, undefined names, ``raise_exception``, a sandbox violation, a budget
exceeded) is a `ChatTemplateError` with a one-line message naming the chat template.
"""

from __future__ import annotations

import functools
import re
import time
import types
from collections.abc import Iterator
from typing import Any

from pvq.errors import GenerationError
from pvq.methods.base import is_int

__all__ = ["ChatTemplateError", "render_chat", "chat_ids", "check_text"]

MAX_STEPS = 2_000_000  # loop iterations + calls + filters + operators + elements walked to size values
MAX_SECONDS = 3.0  # wall clock, checked at every step
MAX_OUTPUT = 1 << 20  # characters of rendered text (plus 4x the characters of the messages)
MAX_TEMPLATE = 1 << 18  # characters of template source (compiling 256 Ki takes a few seconds)
MAX_INT_BITS = 1 << 16  # integers a template may compute
_MAX_DEPTH = 64  # nesting of lists and dicts a template may build


class ChatTemplateError(GenerationError):
    """A chat template that cannot be rendered, or that is refused (the message says why)."""


class _Refused(Exception):
    """Raised inside a render when the budget is exceeded: a class of its own, so that no
    filter's ``except (TypeError, ValueError)`` swallows it; `render_chat` makes it a
    ChatTemplateError."""


def check_text(text: Any, what: str) -> str:
    """`text` if it is a str that encodes as UTF-8; else a one-line error naming `what`
    (a command-line argument with undecodable bytes arrives with surrogate escapes)."""
    if not isinstance(text, str):
        raise GenerationError(f"{what} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        detail = (f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"a lone surrogate U+{c:04X}")
        raise GenerationError(f"{what} is not valid UTF-8 text ({detail} at character {e.start}); "
                              f"give it as UTF-8") from None
    return text


def _one_line(text: Any, limit: int = 240) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


# --- sizes ---------------------------------------------------------------------------------


def _ints(values: Any) -> list[int]:
    """The integers among `values` (one level into tuples and lists, as `%` and calls take them)."""
    out = []
    for v in values:
        if is_int(v):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out.extend(x for x in v if is_int(x))
    return out


def _format_estimate(fmt: str | bytes, args: Any, env: Any) -> int:
    """An upper bound of the length of `fmt % args` / `fmt.format(*args)`: every run of digits
    in the format may be a width or a precision, every field may repeat the largest argument."""
    digits = rb"(?<=[%:.<>^=+\- #,_*{])\d+" if isinstance(fmt, bytes) else r"(?<=[%:.<>^=+\- #,_*{])\d+"
    widths = sum(min(int(m.group()), 1 << 40) for m in re.finditer(digits, fmt))
    fields = fmt.count(b"%" if isinstance(fmt, bytes) else "%") + fmt.count(b"{" if isinstance(fmt, bytes) else "{") + 1
    values = list(args) if isinstance(args, (tuple, list)) else [args]
    biggest = max([env._deep(v) for v in values] + [abs(i) for i in _ints(values)] + [0])
    return len(fmt) + widths + fields * biggest


# --- the environment -----------------------------------------------------------------------

def _base_environment():
    """transformers' chat-template environment (compiled once, cached by transformers)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template("").environment


def _environment_class():
    from jinja2 import nodes
    from jinja2.runtime import LoopContext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import generate_lorem_ipsum, pass_context
    from jinja2.visitor import NodeTransformer

    def _filter(node, name, *args):
        f = nodes.Filter(node, name, [nodes.Const(a) for a in args], [], None, None, lineno=node.lineno)
        return f

    class _Guard(NodeTransformer):
        """Route every loop through `_pvq_iter`, every ``~`` and every output piece through a size check."""

        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = _filter(node.iter, "_pvq_iter")
            return node

        def visit_Concat(self, node):  # each operand before str() makes text of it, then the result
            node = self.generic_visit(node)
            node.nodes = [_filter(c, "_pvq_size") for c in node.nodes]
            return _filter(node, "_pvq_value")

        def visit_List(self, node):  # literals too: [x, x] nested in a loop doubles without an operator
            return _filter(self.generic_visit(node), "_pvq_size")

        visit_Dict = visit_List

        def visit_Tuple(self, node):
            node = self.generic_visit(node)
            return _filter(node, "_pvq_size") if node.ctx == "load" else node

        def visit_Output(self, node):
            node = self.generic_visit(node)
            literal = sum(len(c.data) for c in node.nodes if isinstance(c, nodes.TemplateData))
            node.nodes = [c if isinstance(c, nodes.TemplateData) else _filter(c, "_pvq_out") for c in node.nodes]
            if literal:  # the template's own text counts too (it may sit in a loop or a macro)
                node.nodes.append(_filter(nodes.Const(""), "_pvq_out", literal))
            return node

    class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["+", "*", "**", "%"])

        def __init__(self, base) -> None:
            options = ("block_start_string", "block_end_string", "variable_start_string", "variable_end_string",
                       "comment_start_string", "comment_end_string", "line_statement_prefix",
                       "line_comment_prefix", "trim_blocks", "lstrip_blocks", "newline_sequence",
                       "keep_trailing_newline", "optimized", "undefined", "finalize", "autoescape")
            super().__init__(extensions=[type(e) for e in base.extensions.values()],
                             **{k: getattr(base, k) for k in options})
            self.globals.update(base.globals)
            self.tests.update(base.tests)
            self.filters = {name: self._guard_filter(name, f) for name, f in base.filters.items()}
            self.filters["_pvq_iter"] = pass_context(lambda ctx, value: self._iter(value))
            self.filters["_pvq_value"] = pass_context(lambda ctx, value: self._checked(value))
            self.filters["_pvq_size"] = pass_context(lambda ctx, value: self._sized(value))
            self.filters["_pvq_out"] = pass_context(lambda ctx, value, extra=0: self._out(value, extra))
            self.reset(MAX_OUTPUT)

        def reset(self, max_value: int) -> None:
            self.max_value = max_value
            self.max_produced = 64 * max_value
            self.steps = 0
            self.produced = 0
            self.deadline = time.monotonic() + MAX_SECONDS

        # budget
        def _charge(self, n: int = 1) -> None:
            self.steps += n
            if self.steps > MAX_STEPS:
                raise _Refused(f"it takes too long to render (over {MAX_STEPS:,} steps: a loop without end?)")
            if time.monotonic() > self.deadline:
                raise _Refused(f"it takes too long to render (over {MAX_SECONDS:g} s: a loop without end?)")

        def _refuse_size(self, size: int) -> None:
            if size > self.max_value:
                raise _Refused(f"it builds a value of over {self.max_value:,} characters")

        def _deep(self, v: Any, depth: int = 0) -> int:
            """The size of `v`: characters of strings, elements (and their sizes) of containers;
            stops counting past the limit. Walking costs a step per element."""
            if isinstance(v, (str, bytes)):
                return len(v)
            if is_int(v):
                if v.bit_length() > MAX_INT_BITS:
                    raise _Refused(f"it computes an integer of over {MAX_INT_BITS:,} bits")
                return 1
            if isinstance(v, (list, tuple, set, frozenset, dict, range)):
                if depth > _MAX_DEPTH:
                    raise _Refused(f"it nests lists or dicts over {_MAX_DEPTH} deep")
                self._charge(1 + len(v) // 64)
                if isinstance(v, range):
                    return len(v)
                total = len(v)
                for e in (v.items() if isinstance(v, dict) else v):
                    total += self._deep(e, depth + 1)
                    if total > self.max_value:
                        break
                return total
            return 1

        def _sized(self, v: Any) -> Any:
            """`v`, refused if it is too large (a value that holds others: not counted as built)."""
            self._refuse_size(self._deep(v))
            return v

        def _checked(self, v: Any) -> Any:
            """`v`, refused if it is too large or if it takes the characters built past the limit."""
            size = self._deep(v)
            self._refuse_size(size)
            self.produced += size
            if self.produced > self.max_produced:
                raise _Refused(f"it builds over {self.max_produced:,} characters in all")
            return v

        def _out(self, v: Any, extra: int) -> Any:
            self._charge()
            self._checked(v)
            self.produced += extra
            return v

        def _iter(self, iterable: Any) -> Iterator[Any]:
            for item in iterable:
                self._charge()
                yield item

        def _materialize(self, iterable: Any) -> Any:
            """A list of what `iterable` yields (at a step each), so that its size can be told first."""
            if not isinstance(iterable, (list, tuple, str, bytes)) and hasattr(iterable, "__iter__"):
                items = []
                for x in iterable:
                    self._charge()
                    items.append(x)
                    if len(items) > self.max_value:
                        self._refuse_size(len(items))
                return items
            return iterable

        # what the sandbox routes here
        def call_binop(self, context, operator, left, right):
            self._charge()
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if is_int(n) and isinstance(seq, (str, bytes, list, tuple)):
                        self._refuse_size(max(n, 0) * max(self._deep(seq), 1))
            elif operator == "**" and is_int(left) and is_int(right) and right > 0:
                if max(left.bit_length(), 1) * right > MAX_INT_BITS and abs(left) > 1:
                    raise _Refused(f"it computes an integer of over {MAX_INT_BITS:,} bits")
            elif operator == "%" and isinstance(left, (str, bytes)):
                self._refuse_size(_format_estimate(left, right, self))
            elif operator == "+" and isinstance(left, (str, bytes, list, tuple)):
                self._refuse_size(self._deep(left) + self._deep(right))
            return self._checked(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - the sandbox's own signature
            __self._charge()
            if isinstance(__obj, LoopContext) and args:  # loop(children) in a recursive loop
                args = (__self._iter(args[0]),) + args[1:]
            else:
                args = __self._before_method(__obj, args, kwargs)
            return __self._checked(super().call(__context, __obj, *args, **kwargs))

        def _before_method(self, obj: Any, args: tuple, kwargs: dict) -> tuple:
            """Refuse, before it runs, a str method call (or lipsum) that would build too large a value."""
            if obj is generate_lorem_ipsum:
                n = args[0] if args else kwargs.get("n", 5)
                if is_int(n) and n > 1000:
                    raise _Refused("it asks lipsum for over 1,000 paragraphs")
                return args
            wrapped = getattr(obj, "__wrapped__", obj)  # the sandbox's str.format wrapper
            s = getattr(wrapped, "__self__", None)
            if not isinstance(s, (str, bytes)) or not isinstance(wrapped, types.BuiltinMethodType):
                return args
            name = wrapped.__name__
            try:
                if name == "join" and args:
                    items = self._materialize(args[0])
                    args = (items,) + args[1:]
                    if isinstance(items, (list, tuple, str, bytes)):
                        est = len(items) if isinstance(items, (str, bytes)) else sum(self._deep(x) for x in items)
                        self._refuse_size(est + len(s) * max(len(items) - 1, 0))
                elif name == "replace" and len(args) >= 2:
                    self._refuse_size(_replace_estimate(s, *args[:3]))
                elif name in ("center", "ljust", "rjust", "zfill") and args and is_int(args[0]):
                    self._refuse_size(args[0])
                elif name == "expandtabs":
                    size = args[0] if args else kwargs.get("tabsize", 8)
                    if is_int(size):
                        self._refuse_size(len(s) + s.count(b"\t" if isinstance(s, bytes) else "\t") * size)
                elif name in ("format", "format_map"):
                    values = list(args) + list(kwargs.values())
                    if name == "format_map" and args and isinstance(args[0], dict):
                        values = list(args[0].values())
                    self._refuse_size(_format_estimate(s, values, self))
                elif name == "translate" and args and isinstance(args[0], dict):
                    longest = max([len(v) for v in args[0].values() if isinstance(v, (str, bytes))] + [1])
                    self._refuse_size(len(s) * longest)
            except _Refused:
                raise
            except Exception:  # noqa: BLE001 - bad arguments: the method itself says so
                pass
            return args

        def _guard_filter(self, name: str, func: Any) -> Any:
            from jinja2.utils import _PassArg

            lead = 1 if _PassArg.from_obj(func) is not None else 0
            estimate = _FILTER_ESTIMATES.get(name)

            @functools.wraps(func)
            def guarded(*args, **kwargs):
                self._charge()
                if len(args) > lead:
                    if name in ("join", "sum", "unique", "sort", "list"):
                        args = args[:lead] + (self._materialize(args[lead]),) + args[lead + 1:]
                    if estimate is not None:
                        try:
                            size = estimate(self, *args[lead:], **kwargs)
                        except _Refused:
                            raise
                        except Exception:  # noqa: BLE001 - bad arguments: the filter itself says so
                            size = 0
                        self._refuse_size(size)
                return self._checked(func(*args, **kwargs))

            return guarded

        def _parse(self, source, name, filename):
            return _Guard().visit(super()._parse(source, name, filename))

    return _BudgetedEnvironment


def _replace_estimate(s: str | bytes, old: Any, new: Any, count: Any = -1) -> int:
    old = old if isinstance(old, type(s)) else str(old) if isinstance(s, str) else old
    new = new if isinstance(new, type(s)) else str(new) if isinstance(s, str) else new
    n = s.count(old) if old else len(s) + 1
    if is_int(count) and count >= 0:
        n = min(n, count)
    return len(s) + n * max(len(new) - len(old), 0)


def _json_estimate(env: Any, x: Any, indent: Any, separators: Any) -> int:
    """An upper bound of the length of json.dumps(x, indent=..., separators=...): every character
    may take 6 (an escape), every element a line of indentation at its depth and the separators."""
    elements, depth = _shape(env, x)
    per = (_width(indent) if indent is not None else 0) * depth + 4
    if isinstance(separators, (tuple, list)):
        per += sum(len(_text(p)) for p in separators)
    return 6 * env._deep(x) + elements * per


def _shape(env: Any, v: Any, depth: int = 0) -> tuple[int, int]:
    """(elements, depth) of nested lists and dicts."""
    if not isinstance(v, (list, tuple, dict)):
        return 1, depth
    if depth > _MAX_DEPTH:
        raise _Refused(f"it nests lists or dicts over {_MAX_DEPTH} deep")
    env._charge(1 + len(v) // 64)
    elements, deepest = 1, depth
    for e in (list(v.keys()) + list(v.values()) if isinstance(v, dict) else v):
        n, d = _shape(env, e, depth + 1)
        elements, deepest = elements + n, max(deepest, d)
    return elements, deepest


def _text(v: Any) -> str:
    return v if isinstance(v, str) else str(v)


def _width(v: Any) -> int:
    return v if is_int(v) else len(v) if isinstance(v, str) else 0


_FILTER_ESTIMATES = {
    "center": lambda env, value, width=80: max(len(_text(value)), _width(width)),
    "indent": lambda env, s, width=4, *a, **k: len(_text(s)) + (_text(s).count("\n") + 1) * _width(width),
    "wordwrap": lambda env, s, width=79, break_long_words=True, wrapstring=None, *a, **k: (
        len(_text(s)) + (len(_text(s)) // max(_width(width), 1) + _text(s).count("\n") + 1)
        * len(wrapstring if isinstance(wrapstring, str) else "\n")),
    "replace": lambda env, s, old, new, count=None: _replace_estimate(
        _text(s), old, new, -1 if count is None else count),
    "join": lambda env, value, d="", attribute=None: (
        sum(env._deep(x) if isinstance(x, (str, list, tuple, dict)) else 24 for x in value)
        + len(_text(d)) * max(len(value) - 1, 0)) if isinstance(value, (list, tuple)) else 0,
    "format": lambda env, value, *args, **kwargs: _format_estimate(
        _text(value), list(args) + list(kwargs.values()), env),
    "tojson": lambda env, x, *a, **k: _json_estimate(env, x, k.get("indent", a[1] if len(a) > 1 else None),
                                                     k.get("separators", a[2] if len(a) > 2 else None)),
    "batch": lambda env, value, linecount, fill_with=None: max(linecount, 0) * (env._deep(fill_with) + 1)
    if is_int(linecount) else 0,
    "slice": lambda env, value, slices, fill_with=None: max(slices, 0) * (env._deep(fill_with) + 1)
    if is_int(slices) else 0,
    "sum": lambda env, iterable, attribute=None, start=0: (
        0 if isinstance(start, (int, float)) or len(iterable) < 1000 else env.max_value + 1)
    if isinstance(iterable, (list, tuple)) else 0,
}


@functools.lru_cache(maxsize=1)
def _environment_type():
    return _environment_class()


@functools.lru_cache(maxsize=4)
def _compiled(source: str):
    """(environment, template) for `source`; raises what Jinja raises (a syntax error...)."""
    env = _environment_type()(_base_environment())
    return env, env.from_string(source)


def _template_source(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ChatTemplateError("this tokenizer has no chat template")
    try:
        template = tokenizer.get_chat_template()
    except Exception as e:  # noqa: BLE001 - a dict of templates without a default, ...
        raise ChatTemplateError(f"the chat template cannot be used: {_one_line(e)}") from None
    if not isinstance(template, str):
        raise ChatTemplateError(f"the chat template is not text (a {type(template).__name__})")
    if len(template) > MAX_TEMPLATE:
        raise ChatTemplateError(f"the chat template is {len(template):,} characters long; "
                                f"more than {MAX_TEMPLATE:,} is refused")
    return template


def render_chat(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
    """The text of `messages` through the tokenizer's chat template, as
    ``tokenizer.apply_chat_template(messages, add_generation_prompt=..., tokenize=False)``
    renders it, within a budget of time and size; a ChatTemplateError otherwise."""
    import jinja2

    source = _template_source(tokenizer)
    for m in messages:
        check_text(m.get("content", ""), f"the {m.get('role', 'chat')} message")
    chars = sum(len(m.get("content", "")) for m in messages)
    max_value = MAX_OUTPUT + 4 * chars
    variables = {k: (v if isinstance(v, str) else [str(x) for x in v] if isinstance(v, (list, tuple)) else v)
                 for k, v in dict(getattr(tokenizer, "special_tokens_map", {}) or {}).items()}
    variables.update(messages=[{k: v for k, v in m.items() if v is not None} for m in messages],
                     tools=None, documents=None, add_generation_prompt=add_generation_prompt)
    try:
        env, template = _compiled(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse: {_one_line(e.message)} "
                                f"(line {e.lineno})") from None
    except _Refused as e:
        raise ChatTemplateError(f"the chat template is refused: {e}") from None
    except (RecursionError, MemoryError):
        raise ChatTemplateError("the chat template is refused: it nests too deeply to compile") from None
    except Exception as e:  # noqa: BLE001 - Jinja's compiler and Python's can raise many types
        raise ChatTemplateError(f"the chat template does not compile: {type(e).__name__}: {_one_line(e)}") from None
    env.reset(max_value)
    pieces, size = [], 0
    try:
        for piece in template.generate(**variables):
            size += len(piece)
            if size > max_value:
                raise _Refused(f"it renders over {max_value:,} characters")
            pieces.append(piece)
    except _Refused as e:
        raise ChatTemplateError(f"the chat template is refused: {e}") from None
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"the chat template is refused: it reaches outside Jinja's sandbox "
                                f"({_one_line(e)})") from None
    except jinja2.exceptions.UndefinedError as e:
        raise ChatTemplateError(f"the chat template fails: {_one_line(e)}") from None
    except jinja2.exceptions.TemplateError as e:  # raise_exception(...) in the template
        raise ChatTemplateError(f"the chat template raised an error: {_one_line(e)}") from None
    except RecursionError:
        raise ChatTemplateError("the chat template is refused: it recurses too deeply") from None
    except MemoryError:
        raise ChatTemplateError("the chat template is refused: it runs out of memory") from None
    except Exception as e:  # noqa: BLE001 - whatever Python raises inside the template (TypeError, ...)
        raise ChatTemplateError(f"the chat template fails: {type(e).__name__}: {_one_line(e)}") from None
    return "".join(pieces)


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = True):
    """Token ids (a [1, n] LongTensor) of `messages` through the chat template, the same ids
    ``tokenizer.apply_chat_template(..., return_tensors="pt")`` gives."""
    import torch

    text = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids.to(torch.long)
