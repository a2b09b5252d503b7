"""The activation peak of a compiled step on CPU, read from the code Inductor generated for it.

A `TorchDispatchMode` cannot see inside a compiled graph, and the process's resident set mixes the
step with everything else the process holds (compile_bench reports it beside this figure). The
generated `call` of each compiled graph says exactly what it allocates and when it lets go:
`bufN = empty_strided_cpu(shape, stride, dtype)` allocates, `bufM = bufN; del bufN  # reuse` and
`reinterpret_tensor(bufN, ...)` alias a storage, `del x` drops a name, and every tensor the graph
takes in (`a, b, c = args`: for a backward, the activations the forward saved) is live from the
start until deleted, sized by the module's own benchmark harness (`rand_strided(shape, stride,
dtype)`). So the live bytes after each line, less parameters and inputs (`primals_*`), incoming
gradients (`tangents_*`) and the parameter gradients a backward returns, are the graph's
activation memory over time, as the budget counts it (DESIGN.md), independent of remat_kit's cost model: the
analogue of XLA's `memory_analysis()` on the JAX side.

A fallback kernel (`bufN = torch.ops.aten.cumsum.default(...)`, SDPA on CPU) returns fresh tensors
whose sizes the code asserts on the names it unpacks them into (`bufM = bufN[0]`,
`assert_size_stride(bufM, shape, stride, ...)`); their dtype is the one the call names, float32
otherwise (this reading is for float32 CPU steps). A tensor made and never sized raises
`UnreadableCode` rather than leave it out: an undercount would pass a budget it breaks.
"""

from __future__ import annotations

import dataclasses
import re

_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2}
_ITEMSIZE |= {"int8": 1, "uint8": 1, "bool": 1}
_SKIP = ("primals_", "tangents_")

_ALLOC = re.compile(r"\s+(\w+) = empty_strided_cpu\(\((.*?)\), \((.*?)\), torch\.(\w+)\)")
_INPUT = re.compile(r"\s+assert_size_stride\((\w+), \((.*?)\), \((.*?)\)")
_ALIAS = re.compile(r"\s+(\w+) = (?:reinterpret_tensor\()?(\w+)\s*(?:[,;)]|$)")
_ASSIGN = re.compile(r"\s+(\w+) = ")
_ITEM = re.compile(r"\s+(\w+) = (\w+)(\[\d+\])+\s*$")
_CALL = re.compile(r"\s+(\w+) = (?:torch\.ops|extern_kernels)\.[\w.]+\(")
_DTYPE = re.compile(r"dtype=torch\.(\w+)")
_RAND = re.compile(r"\s+(\w+) = rand_strided\(\((.*?)\), \((.*?)\),.*dtype=torch\.(\w+)")
_SYMBOL = re.compile(r"\s+\w+ = (\w+\.(size|stride)\(\)|\w+_(size|stride)\[\d+\])\s*$")  # a dynamic size bound
_DEL = re.compile(r"\bdel (\w+)")
_UNPACK = re.compile(r"\s+([\w, ]+?),?\s*=\s*args\s*$")
_RETURN = re.compile(r"\s+return \((.*)\)")


class UnreadableCode(ValueError):
    """Generated code making a tensor whose size this reading cannot tell."""


@dataclasses.dataclass(frozen=True)
class GraphPeak:
    peak_bytes: int  # activation bytes live at the graph's peak (parameters and their gradients left out)
    line: str  # the generated line after which that peak is reached
    # The storages live at the peak, largest first: (their names in the code, bytes). For asking
    # which tensors make a peak (a saved input, a workspace, a buffer reused at a larger size).
    live: tuple[tuple[str, int], ...] = ()


def _itemsize(dtype: str) -> int:
    if dtype not in _ITEMSIZE:
        raise UnreadableCode(f"no item size known for torch.{dtype}")
    return _ITEMSIZE[dtype]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace("(", "").replace(")", "").split(",") if x.strip()]


def _nbytes(shape: list[int], stride: list[int], itemsize: int) -> int:
    if any(s == 0 for s in shape):
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(shape, stride, strict=True))) * itemsize


class _Live:
    """Storages alive under the names the generated code gives them."""

    def __init__(self) -> None:
        self.storage: dict[str, int] = {}
        self.size: dict[int, int] = {}
        self.names: dict[int, set[str]] = {}
        self.bytes = 0
        self.tuples: set[int] = set()  # storages of fallback kernels' results unpacked by index
        self.unsized: dict[int, int] = {}  # storage -> itemsize, for a fallback kernel's output

    def new(self, name: str, nbytes: int, unsized_itemsize: int = 0) -> None:
        key = len(self.size)
        self.storage[name], self.size[key], self.names[key] = key, nbytes, {name}
        self.bytes += nbytes
        if unsized_itemsize:
            self.unsized[key] = unsized_itemsize

    def size_at(self, name: str, shape: list[int], stride: list[int]) -> None:
        """The asserted size of a fallback kernel's output `name`."""
        key = self.storage[name]
        itemsize = self.unsized.pop(key, 0)
        if itemsize:
            self.size[key] = _nbytes(shape, stride, itemsize)
            self.bytes += self.size[key]

    def alias(self, name: str, of: str) -> None:
        key = self.storage[of]
        self.storage[name] = key
        self.names[key].add(name)

    def drop(self, name: str) -> None:
        key = self.storage.pop(name, None)
        if key is not None:
            self.names[key].discard(name)
            if not self.names[key]:
                if key in self.unsized and key not in self.tuples:
                    raise UnreadableCode(f"`{name}`, made by a fallback kernel, is dropped before its size is asserted")
                self.bytes -= self.size[key]

    def held(self, names: set[str]) -> int:
        return sum(self.size[k] for k in {self.storage[n] for n in names if n in self.storage})

    def snapshot(self, leave_out: set[str]) -> tuple[tuple[str, int], ...]:
        """The live storages not held by a name in `leave_out`, largest first."""
        out_keys = {self.storage[n] for n in leave_out if n in self.storage}
        keys = {k for k in self.storage.values() if k not in out_keys}
        return tuple(sorted(((",".join(sorted(self.names[k])), self.size[k]) for k in keys), key=lambda t: -t[1]))


def _read_line(ln: str, live: _Live, inputs: dict[str, tuple[str, str, str]]) -> None:
    """What one generated line does to the live storages (before its `del`s)."""
    if m := _INPUT.match(ln):
        name = m.group(1)
        if name in live.storage:
            if live.storage[name] in live.unsized:  # else sized already (its assert may be symbolic)
                live.size_at(name, _ints(m.group(2)), _ints(m.group(3)))
        elif not name.startswith(_SKIP):
            # The harness's example input where there is one: its shape is concrete where the
            # assert's is symbolic.
            shape, stride, dtype = inputs.get(name, (m.group(2), m.group(3), "float32"))
            live.new(name, _nbytes(_ints(shape), _ints(stride), _itemsize(dtype)))
    elif m := _ALLOC.match(ln):
        live.new(m.group(1), _nbytes(_ints(m.group(2)), _ints(m.group(3)), _itemsize(m.group(4))))
    elif m := _CALL.match(ln):
        if "out=" not in ln:  # a fallback kernel's fresh result, sized where the code asserts it
            dtype = _DTYPE.search(ln)
            live.new(m.group(1), 0, _itemsize(dtype.group(1)) if dtype else 4)
    elif (m := _ITEM.match(ln)) and m.group(2) in live.storage:
        parent = live.storage[m.group(2)]
        live.tuples.add(parent)
        live.new(m.group(1), 0, live.unsized.get(parent, 4))
    elif (m := _ALIAS.match(ln)) and m.group(2) in live.storage:
        live.alias(m.group(1), m.group(2))
    elif (m := _ASSIGN.match(ln)) and not ln.strip().startswith(("return", "args")) and not _SYMBOL.match(ln):
        raise UnreadableCode(f"cannot size the tensor this generated line makes: {ln.strip()!r}")


def call_peak(lines: list[str], inputs: dict[str, tuple[str, str, str]] | None = None) -> GraphPeak:
    """The activation peak of one generated `call(args)` body (`lines`, from `def call` to its
    `return`); `inputs`: the graph inputs' (shape, stride, dtype) as the module's harness makes
    them (where not given: the shape the body asserts, float32). Every input is live from the
    start (the code asserts an input's size only where it first reads it) until it is deleted."""
    inputs = dict(inputs or {})
    names: list[str] = []
    returned: set[str] = set()
    for ln in lines:
        if (m := _UNPACK.match(ln)) and not names:
            names = [n.strip() for n in m.group(1).split(",") if n.strip()]
        elif (m := _INPUT.match(ln)) and m.group(1) not in inputs:
            inputs[m.group(1)] = (m.group(2), m.group(3), "float32")
        elif m := _RETURN.match(ln):
            returned = set(re.findall(r"\b(buf\d+)\b", m.group(1)))
    if not any(n.startswith("tangents_") for n in names):
        returned = set()  # a forward: what it returns is the activations it saves, and its output
    live, peak, at, at_peak = _Live(), 0, "", ()
    for name in names:
        if not name.startswith(_SKIP):
            if name not in inputs:
                raise UnreadableCode(f"the size of graph input `{name}` is neither asserted nor in the harness")
            shape, stride, dtype = inputs[name]
            live.new(name, _nbytes(_ints(shape), _ints(stride), _itemsize(dtype)))
    for ln in lines:
        _read_line(ln, live, inputs)
        for name in _DEL.findall(ln):
            live.drop(name)
        now = live.bytes - live.held(returned)  # parameter gradients made so far are not activation
        if now > peak:
            peak, at, at_peak = now, ln.strip(), live.snapshot(returned)
    unsized = [n for k in live.unsized if k not in live.tuples for n in live.names[k]]
    if unsized:
        raise UnreadableCode(f"{unsized}, made by a fallback kernel, never have their size asserted")
    return GraphPeak(peak, at, at_peak)


def module_peaks(source: str) -> list[GraphPeak]:
    """The peak of every `call` in one generated module's source."""
    lines = source.splitlines()
    # The module's own benchmark harness makes every graph input with its dtype.
    inputs = {m.group(1): (m.group(2), m.group(3), m.group(4)) for ln in lines if (m := _RAND.match(ln))}
    out = []
    for i, ln in enumerate(lines):
        if ln.strip().startswith("def call(self, args)") or ln.strip().startswith("def call(args)"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("return ("))
            out.append(call_peak(lines[i : end + 1], inputs))
    return out


def loaded_sources() -> list[str]:
    """The source of every module Inductor has loaded in this process, oldest first (clear the
    list with `torch._inductor.codecache.PyCodeCache.cache_clear()` before the compile to read)."""
    from torch._inductor.codecache import PyCodeCache

    out = []
    for mod in PyCodeCache.modules:
        with open(mod.__file__) as f:
            out.append(f.read())
    return out


def step_peak(sources: list[str]) -> int:
    """A compiled step's activation peak: the largest of its graphs' (the forward's saved tensors
    are among the backward's inputs, so the backward's reading includes them)."""
    return max((p.peak_bytes for s in sources for p in module_peaks(s)), default=0)
