"""Timed training steps for pytest-benchmark (not collected by a plain `pytest`: testpaths = tests).

    pytest benchmarks/ --benchmark-only --benchmark-json=runs/bench.json
    python -m benchmarks.compare reports/baseline/bench.json runs/bench.json

One forward + backward of tiny zoo models under none / all / auto@0.5 in both frameworks, one
CPU thread. `compare` reads each median as a ratio to `none` of the same framework and model.
"""

from __future__ import annotations

import os

import pytest

from benchmarks._cells import Cell

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")  # before jax is imported
CASES = [
    Cell(fw, model, "tiny", s, 0.5 if s == "auto" else None)
    for fw in ("jax", "torch")
    for model in ("gpt", "mlp")
    for s in ("none", "all", "auto")
]


def _jax_step(cell: Cell):
    jax = pytest.importorskip("jax")
    from benchmarks import _jax_cell
    from benchmarks.models.jax_zoo import build

    model = build(cell.model, cell.size)
    loss = _jax_cell._loss_fns(model, cell)[0]
    compiled = jax.jit(jax.value_and_grad(loss)).lower(model.params, model.batch).compile()
    return lambda: jax.block_until_ready(compiled(model.params, model.batch))


def _torch_step(cell: Cell):
    torch = pytest.importorskip("torch")
    from benchmarks import _torch_cell
    from benchmarks.models.torch_zoo import build

    torch.set_num_threads(1)
    model, (inputs, targets) = build(cell.model, cell.size)
    fn = _torch_cell.apply(model, cell)

    def step() -> None:
        model.zero_grad(set_to_none=False)
        fn(inputs, targets).backward()

    return step


@pytest.mark.parametrize("cell", CASES, ids=[c.id.replace("/tiny/", "-").replace("/", "-") for c in CASES])
def test_step_time(benchmark, cell: Cell) -> None:
    # A strategy that fails (auto included) fails the benchmark: a skip would drop the cell from
    # the comparison with the baseline, and `compare` would never see the regression.
    step = _jax_step(cell) if cell.framework == "jax" else _torch_step(cell)
    step()  # plans (auto), compiles and warms up outside the timed rounds
    benchmark.extra_info.update(framework=cell.framework, model=cell.model, strategy=cell.strategy, budget=cell.budget)
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=2)
