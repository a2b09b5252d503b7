"""What a state can hold, and that every kind of leaf comes back exactly (remat_kit.resume codec)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from remat_kit import resume  # noqa: E402
from remat_kit.resume._decode import decode, plan  # noqa: E402
from remat_kit.resume._writing import encode  # noqa: E402


def saved(state):
    """The codec alone, in memory: encodes `state` now, returns `restore(template=None)`; JAX
    arrays are handed over as they are (Orbax's part)."""
    encoded = encode(state)
    spec = json.loads(json.dumps(encoded.spec))  # exactly what the JSON item stores
    copies = {k: v.copy() for k, v in encoded.arrays.items()}

    def host(key, dtype, shape, local, out=None):
        if out is None:
            return copies[key]
        out[...] = copies[key]
        return out

    def restore(template=None):
        kwargs = {"host": host, "jax_arrays": encoded.jax_arrays}
        if template is None:
            return decode(spec, **kwargs)
        plan(spec, template, local_specs=None, step=None)  # as read_step: nothing is read before it passes
        return decode(spec, template, **kwargs)

    return restore


def round_trip(state, template=None):
    return saved(state)(template)


def assert_same(a, b):
    """Equal values, types and dtypes, recursively (bit-identical arrays, NaN == NaN)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, float):
        assert repr(a) == repr(b)
    else:
        assert a == b


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.text(max_size=5),
    st.floats(allow_nan=True, allow_infinity=True),
)
np_arrays = st.builds(
    lambda shape, dtype, seed: np.random.default_rng(seed).normal(size=shape).astype(dtype),
    st.lists(st.integers(0, 3), max_size=3).map(tuple),
    st.sampled_from(["float32", "float64", "float16", "int8", "int64", "uint16", "bool", "complex64"]),
    st.integers(0, 2**31),
)
trees = st.recursive(
    st.one_of(json_scalars, np_arrays),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(0, 9)), children, max_size=3),
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(trees)
def test_any_tree_of_json_and_numpy_round_trips_exactly(tree):
    assert_same(round_trip(tree), tree)


def test_jax_arrays_keys_and_pytrees_round_trip():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}
    state = {
        "params": params,
        "opt": optax.adam(1e-3).init(params),
        "key": jax.random.key(7),
        "raw_key": jax.random.PRNGKey(3),
        "step": jnp.int32(5),
    }
    restored = round_trip(state, template=state)
    assert type(restored["opt"][0]) is type(state["opt"][0])  # optax NamedTuple rebuilt from template
    assert jax.random.key_impl(restored["key"]) == jax.random.key_impl(state["key"])
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(state["key"]))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert isinstance(a, jax.Array) and a.dtype == b.dtype
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), restored["params"], params))
    # Without a template the tree is plain containers, arrays still JAX arrays.
    bare = round_trip(state)
    assert isinstance(bare["opt"][0], dict) and isinstance(bare["params"]["w"], jax.Array)


TORCH_DTYPES = [
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "bool",
    "complex64",
    "float8_e4m3fn",
    "float8_e5m2",
]


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_every_torch_dtype_round_trips_bit_identical(dtype):
    torch = pytest.importorskip("torch")
    source = torch.randn(3, 5, dtype=torch.float64) * 10
    tensor = source.to(getattr(torch, dtype)) if dtype != "bool" else source > 0
    restored = round_trip({"t": tensor, "scalar": tensor[0, 0]})
    for a, b in ((restored["t"], tensor), (restored["scalar"], tensor[0, 0])):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
        assert a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).contiguous().view(torch.uint8))


def test_torch_model_optimizer_scheduler_restore_in_place_with_nested_structure():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1)).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(2):
        model(torch.ones(2, 4, dtype=torch.bfloat16)).sum().backward()
        optimizer.step()
        scheduler.step()
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    restore = saved(state)

    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1)).to(torch.bfloat16)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1, gamma=0.5)
    out = restore({"model": fresh, "optimizer": fresh_opt, "scheduler": fresh_sched})
    assert out["model"] is fresh
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert a.dtype == b.dtype and a.equal(b)
    want, got = optimizer.state_dict(), fresh_opt.state_dict()
    assert got["param_groups"] == want["param_groups"] and got["state"].keys() == want["state"].keys()
    for index, entry in want["state"].items():
        for name, value in entry.items():
            assert got["state"][index][name].dtype == value.dtype and got["state"][index][name].equal(value)
    assert fresh_sched.state_dict() == scheduler.state_dict()
    # No template: the optimizer state dict comes back with its int keys and nested lists.
    bare = round_trip(state)
    assert list(bare["optimizer"]["state"]) == [0, 1, 2, 3] and isinstance(bare["optimizer"]["param_groups"], list)


def test_rng_states_of_python_numpy_torch_and_generators_resume_the_same_stream():
    torch = pytest.importorskip("torch")
    gens = {
        "py": random.Random(1),
        "np": np.random.default_rng(2),
        "mt": np.random.Generator(np.random.MT19937(3)),
        "torch": torch.Generator().manual_seed(4),
        "global": resume.GlobalRNG(),
    }
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    restore = saved(gens)

    def draw(g):
        return (
            g["py"].random(),
            g["np"].random(),
            g["mt"].random(),
            torch.rand(1, generator=g["torch"]).item(),
            random.random(),
            np.random.rand(),
            torch.rand(1).item(),
        )

    first = draw(gens)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # disturb the global streams
    template = {
        "py": random.Random(),
        "np": np.random.default_rng(),
        "mt": np.random.Generator(np.random.MT19937()),
        "torch": torch.Generator(),
        "global": resume.GlobalRNG(),
    }
    assert draw(restore(template)) == first
    bare = restore()  # generators are rebuilt, global state returned as data
    assert bare["py"].random() == first[0] and bare["np"].random() == first[1]


def test_shuffled_iterator_resumes_at_the_exact_next_batch_across_epochs():
    data = np.arange(10) * 100
    reference = resume.ShuffledIterator(data, batch_size=3, seed=1)
    expected = [next(reference).tolist() for _ in range(12)]  # 4 epochs of 3 batches
    assert sorted(sum(expected[:3], [])) != sum(expected[:3], [])  # it does shuffle
    for cut in range(12):
        first = resume.ShuffledIterator(data, batch_size=3, seed=1)
        head = [next(first).tolist() for _ in range(cut)]
        second = round_trip({"it": first}, {"it": resume.ShuffledIterator(data, batch_size=3, seed=1)})["it"]
        assert head + [next(second).tolist() for _ in range(12 - cut)] == expected
    assert isinstance(reference, resume.CheckpointableIterator)


def test_template_mismatch_names_every_differing_key_and_changes_nothing():
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(2, 2)
    restore = saved({"a": np.zeros(3, np.float32), "b": {"c": 1}, "m": model, "l": [1, 2]})
    other = torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(resume.TemplateMismatchError) as info:
        restore({"a": np.zeros(4, np.float32), "b": {"d": 1}, "m": other, "l": [1]})
    message = str(info.value)
    for expected in (
        "state['a']: saved float32[3], template has float32[4]",
        "state['b']['d']: in the template but not in the checkpoint",
        "state['b']['c']: in the checkpoint but not in the template",
        "state['l']: saved 2 items, template has 1",
    ):
        assert expected in message
    assert all(p.equal(q) for p, q in zip(other.parameters(), before))  # no partial in-place load


def test_unsupported_leaves_and_keys_are_rejected_with_the_path_and_the_fix():
    with pytest.raises(TypeError, match=r"state\['x'\]\[0\] is a builtins.object.*Allowed"):
        encode({"x": [object()]})
    with pytest.raises(TypeError, match=r"state has the key \(1, 2\) of type tuple.*str or int keys"):
        encode({(1, 2): 1})
    with pytest.raises(TypeError, match=r"state\['names'\] is an array of dtype <U1; only numeric and bool"):
        encode({"names": np.array(["a", "b"])})


def test_numpy_scalars_keep_their_type():
    state = {"f64": np.float64(0.1), "i8": np.int8(-3), "b": np.bool_(True), "s": np.str_("x")}
    restored = round_trip(state)
    assert [type(v) for v in restored.values()] == [np.float64, np.int8, np.bool_, str]
    assert restored["f64"] == state["f64"] and restored["i8"] == -3 and restored["s"] == "x"


def test_flax_struct_dataclass_round_trips_through_its_template():
    jax = pytest.importorskip("jax")
    flax_struct = pytest.importorskip("flax.struct")

    @flax_struct.dataclass
    class TrainState:
        params: dict
        step: jax.Array
        lr: float = flax_struct.field(pytree_node=False, default=0.1)

    state = TrainState(params={"w": jax.numpy.ones((2, 2))}, step=jax.numpy.int32(3), lr=0.5)
    restored = round_trip(state, template=state)
    assert type(restored) is TrainState and restored.lr == 0.5 and int(restored.step) == 3
    assert isinstance(round_trip(state), dict)  # no template: children by attribute path


def test_importing_remat_kit_resume_does_not_import_torch_and_without_orbax_says_what_to_install():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    lazy = (
        "import sys, remat_kit; assert 'jax' not in sys.modules and 'orbax' not in sys.modules; "
        "import remat_kit.resume; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    no_orbax = (
        "import sys; sys.modules['orbax'] = None\n"  # None in sys.modules blocks the import
        "try:\n    import remat_kit.resume\nexcept ImportError as e:\n    print(e)"
    )
    outputs = []
    for code in (lazy, no_orbax):
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=root,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        )
        outputs.append(result.stdout.strip())
        assert result.returncode == 0, result.stderr[-2000:]
    assert outputs[0] == "ok"
    assert outputs[1].startswith("remat_kit.resume needs orbax-checkpoint") and "pip install" in outputs[1]


def test_torch_restore_loads_into_the_templates_tensors_without_new_storage(tmp_path):
    """Like dcp.load: a template's tensors receive the data (no new tensor, no whole-state host
    copy); a non-contiguous or non-numpy template tensor is filled through a leaf buffer."""
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 4)
    state = {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.arange(6, dtype=torch.bfloat16),
        "t": torch.arange(6, dtype=torch.float64).reshape(2, 3),
        "m": model,
    }
    with resume.Resumable(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, state)
        template = {
            "w": torch.zeros(3, 4),
            "b": torch.zeros(6, dtype=torch.bfloat16),
            "t": torch.zeros(3, 2, dtype=torch.float64).T,  # not contiguous
            "m": torch.nn.Linear(3, 4),
        }
        pointers = {k: template[k].data_ptr() for k in ("w", "b", "t")}
        weight = template["m"].weight
        weight_pointer = weight.data_ptr()
        restored = ckpt.restore(0, template)
    for key in ("w", "b", "t"):
        assert restored[key] is template[key] and restored[key].data_ptr() == pointers[key]
        assert torch.equal(restored[key], state[key])
    assert restored["m"].weight is weight and weight.data_ptr() == weight_pointer
    assert torch.equal(weight, model.weight) and torch.equal(restored["m"].bias, model.bias)


def test_a_truncated_host_array_is_reported_not_read_short(tmp_path):
    from remat_kit.resume import _host_item

    _host_item.write_arrays(tmp_path, {"a0": np.arange(10, dtype=np.float32)})
    path = tmp_path / "a0.npy"
    path.write_bytes(path.read_bytes()[:-4])
    out = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="truncated"):
        _host_item.read_array(tmp_path, "a0", np.dtype(np.float32), [10], out)
    with pytest.raises(ValueError, match="truncated"):
        _host_item.read_array(tmp_path, "a0", np.dtype(np.float32), [10])
