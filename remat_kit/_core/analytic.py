"""Cost graphs built from shapes alone, for planning models too large to trace here.

`transformer_graph` models a GPT layer op by op the way Korthikanti et al. ("Reducing Activation
Recomputation in Large Transformer Models", 2022) count it: fp16/bf16 activations, one-byte
dropout masks, no flash attention. Its no-remat bytes kept per layer are exactly
``s·b·h·(34 + 5·a·s/h)``, the paper's formula (tested).
"""

from __future__ import annotations

from remat_kit._core.graph import CostGraph, OpKind, Value, value


def transformer_graph(
    *,
    num_layers: int,
    seq_len: int,
    batch: int,
    hidden: int,
    num_heads: int,
    ffn_mult: int = 4,
    bytes_per_elem: int = 2,
    dropout: bool = True,
) -> CostGraph:
    """A GPT-style decoder stack: one block per layer, then a loss block.

    Per layer: LN → Q, K, V projections → scores → softmax → dropout → attention over V →
    output projection → dropout → residual add → LN → FC1 → GeLU → FC2 → dropout → residual add.
    """
    _check_shape(
        num_layers=num_layers,
        seq_len=seq_len,
        batch=batch,
        hidden=hidden,
        num_heads=num_heads,
        ffn_mult=ffn_mult,
        bytes_per_elem=bytes_per_elem,
    )
    s, b, h, e, f = seq_len, batch, hidden, bytes_per_elem, ffn_mult
    sbh = s * b * h
    vals: list[Value] = [value("x", sbh * e, role="input")]
    for name, n in (("wq", h * h), ("wk", h * h), ("wv", h * h), ("wo", h * h), ("w1", f * h * h), ("w2", f * h * h)):
        vals.append(value(name, n * e, role="param"))
    vals += [value("ln1.scale", h * e, role="param"), value("ln2.scale", h * e, role="param")]
    layer = _Layer(vals, s, b, h, num_heads, f, e, dropout)
    x = "x"
    for i in range(num_layers):
        x = layer.build(i, x)
    vals.append(
        value("loss", 4, kind=OpKind.REDUCTION, flops=sbh, deps=[x], bwd_reads=[], module="loss", block=num_layers)
    )
    return CostGraph(vals, block_names=[f"layers.{i}" for i in range(num_layers)] + ["loss"])


def _check_shape(**args: int) -> None:
    for name, arg in args.items():
        if not isinstance(arg, int) or isinstance(arg, bool) or arg <= 0:
            raise ValueError(f"transformer_graph({name}={arg!r}): must be a positive int.")
    if args["hidden"] % args["num_heads"]:
        raise ValueError(
            f"transformer_graph(hidden={args['hidden']}, num_heads={args['num_heads']}): hidden must divide by "
            "num_heads."
        )


class _Layer:
    """Appends one transformer layer's values to `vals`, op by op (Korthikanti et al.'s count)."""

    def __init__(self, vals: list[Value], s: int, b: int, h: int, a: int, f: int, e: int, dropout: bool):
        self.vals = vals
        self.s, self.b, self.h, self.a, self.f, self.e = s, b, h, a, f, e
        self.dropout = dropout
        self.sizes = {v.name: v.num_bytes for v in vals}
        self.prefix, self.block = "", 0

    def op(
        self,
        name: str,
        elems: int,
        kind: OpKind,
        flops: int,
        deps: list[str],
        reads: list[str] | None = None,
        module: str = "",
        elem_bytes: int | None = None,
    ) -> str:
        p = self.prefix
        full = f"{p}.{name}"
        nbytes = elems * (self.e if elem_bytes is None else elem_bytes)
        in_bytes = sum(self.sizes[d] for d in deps)
        self.sizes[full] = nbytes
        self.vals.append(
            value(
                full,
                nbytes,
                kind=kind,
                flops=flops,
                deps=deps,
                bwd_reads=deps if reads is None else reads,
                module=f"{p}.{module}" if module else p,
                block=self.block,
                bytes_moved=in_bytes + nbytes,
            )
        )
        return full

    def build(self, i: int, x: str) -> str:
        """Layer `i` on input `x`; returns its output's name."""
        self.prefix, self.block = f"layers.{i}", i
        return self._mlp(self._attention(x))

    def _attention(self, x: str) -> str:
        op, s, b, h, a = self.op, self.s, self.b, self.h, self.a
        sbh, as2b = s * b * h, a * s * s * b
        ln1 = op("ln1", sbh, OpKind.NORM, 8 * sbh, [x, "ln1.scale"], [x], "ln1")
        q = op("q", sbh, OpKind.MATMUL, 2 * sbh * h, [ln1, "wq"], [ln1], "attn")
        k = op("k", sbh, OpKind.MATMUL, 2 * sbh * h, [ln1, "wk"], [ln1], "attn")
        v = op("v", sbh, OpKind.MATMUL, 2 * sbh * h, [ln1, "wv"], [ln1], "attn")
        scores = op("scores", as2b, OpKind.ATTENTION, 2 * s * s * b * h, [q, k], [q, k], "attn.core")
        probs = op("softmax", as2b, OpKind.ATTENTION, 5 * as2b, [scores], [], "attn.core")
        self.vals[-1] = _reads_self(self.vals[-1])
        if self.dropout:
            m1 = op("attn_mask", as2b, OpKind.RNG, as2b, [], [], "attn.core", elem_bytes=1)
            probs = op("attn_dropout", as2b, OpKind.ATTENTION, 2 * as2b, [probs, m1], [m1], "attn.core")
        ctx = op("context", sbh, OpKind.ATTENTION, 2 * s * s * b * h, [probs, v], [probs, v], "attn.core")
        proj = op("proj", sbh, OpKind.MATMUL, 2 * sbh * h, [ctx, "wo"], [ctx], "attn")
        if self.dropout:
            m2 = op("proj_mask", sbh, OpKind.RNG, sbh, [], [], "attn", elem_bytes=1)
            proj = op("proj_dropout", sbh, OpKind.ELEMENTWISE, 2 * sbh, [proj, m2], [m2], "attn")
        return op("residual1", sbh, OpKind.ELEMENTWISE, sbh, [x, proj], [], "attn")

    def _mlp(self, x1: str) -> str:
        op, f, h = self.op, self.f, self.h
        sbh = self.s * self.b * h
        ln2 = op("ln2", sbh, OpKind.NORM, 8 * sbh, [x1, "ln2.scale"], [x1], "ln2")
        fc1 = op("fc1", f * sbh, OpKind.MATMUL, 2 * sbh * f * h, [ln2, "w1"], [ln2], "mlp")
        act = op("gelu", f * sbh, OpKind.ELEMENTWISE, 8 * f * sbh, [fc1], [fc1], "mlp")
        fc2 = op("fc2", sbh, OpKind.MATMUL, 2 * sbh * f * h, [act, "w2"], [act], "mlp")
        if self.dropout:
            m3 = op("mlp_mask", sbh, OpKind.RNG, sbh, [], [], "mlp", elem_bytes=1)
            fc2 = op("mlp_dropout", sbh, OpKind.ELEMENTWISE, 2 * sbh, [fc2, m3], [m3], "mlp")
        return op("residual2", sbh, OpKind.ELEMENTWISE, sbh, [x1, fc2], [], "mlp")


def _reads_self(v: Value) -> Value:
    """Softmax's backward reads its own output."""
    import dataclasses

    return dataclasses.replace(v, bwd_reads=(v.name,))


def megatron_bytes_per_layer(*, seq_len: int, batch: int, hidden: int, num_heads: int) -> int:
    """Korthikanti et al. (2022), eq. 1: activation bytes per layer, 16-bit, no recompute."""
    s, b, h, a = seq_len, batch, hidden, num_heads
    return s * b * h * 34 + 5 * a * s * s * b
