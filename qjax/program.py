"""``Program``: an imported int8 model as a list of named steps, jitted once per input shape.

A converter (torch eager/FX, torchao pt2e, ...) turns a foreign graph into a
:class:`Program`: an ordered list of :class:`Step` over an environment of named values.
The environment starts with the program's inputs (float arrays, under the names in
``inputs``); each step reads the values named in ``Step.inputs``, calls
``Step.fn(params, *values)`` with its own prepared ``params`` (a pytree: weights, sums,
bias), and stores the result under ``Step.name``. The program returns the value(s) named
by ``output`` (a name, or a tuple/list/dict of names).

Every step whose result is a :class:`~qjax.QArray` and whose ``traced`` flag is set is an
*activation*: :meth:`Program.trace` returns ``{step name: QArray}`` for all of them, in
step (graph) order, passed through ``Step.export`` first when a step stores its value in
an internal layout (e.g. NHWC codes for a torch NCHW tensor: ``export`` transposes back).

``__call__`` and ``run_traced`` (which ``trace`` calls: one program returning the output
and the activations together) are ``jax.jit`` functions of ``(params, inputs)``: the
weights are arguments, not constants folded into the program, and XLA compiles each once
per input shape and dtype (``Program.compile_count`` counts the traces, for tests).
:meth:`Program.freeze` returns a :class:`FrozenProgram` instead: the params compiled in as
constants, for serving where a call's fixed cost matters.

``Program.refresh`` (``None``, or a function of the program) runs before a call whenever
``params`` or one of its entries was replaced since it last ran (identity): a converted
Flax program folds its native layers' requantization coefficients from the params there
(:mod:`qjax.flax._fold`), so an edit never runs on coefficients of the old params.

Inputs may be numpy arrays, jax arrays, Python scalars or torch tensors (float): torch
tensors are detached and copied through numpy (torch is never imported here).

``Program.layers`` describes each step for reports: a :class:`Layer` with the op kind,
the source target (e.g. ``"torch.ao.nn.quantized.Linear"``), the scheme the kernel ran
with, and the weight and output qparams (``None`` where a step has none).

``Program.layout`` says how the program's values (inputs, trace, outputs) order the
channels of an image tensor: ``None`` or ``"NCHW"`` (default; the logical channels-first
order of torch, NCHW / NCW, whatever order steps store values in internally) or ``"NHWC"``
(channels last: NHWC / NWC, a Flax model's order; conv steps then run channels-last).
Exporters read it (:func:`qjax.converters.onnx.export_onnx`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ._qarray import QArray
from ._spec import QParams

__all__ = ["LAYOUTS", "FrozenProgram", "Layer", "Program", "Step"]

LAYOUTS = (None, "NCHW", "NHWC")  # Program.layout: channels first (None, "NCHW") or last


@dataclasses.dataclass(frozen=True)
class Layer:
    """What one step is, for reports and error messages (no arrays are needed to run it).

    Fields: ``op`` (kind: ``"linear"``, ``"conv2d"``, ``"add"``, ``"quantize"``, ...),
    ``target`` (the source op or module type, a string), ``scheme`` (requant / add / pool
    scheme used, ``None`` for ops without arithmetic), ``weight`` and ``out``
    (:class:`~qjax.QParams` or ``None``), ``extra`` (op options: stride, accumulate, ...).
    """

    op: str
    target: str
    scheme: str | None = None
    weight: QParams | None = None
    out: QParams | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Step:
    """One named step: ``env[name] = fn(params, *[env[i] for i in inputs])``.

    ``fn`` must be traceable by ``jax.jit`` (static options closed over, arrays in
    ``params``). ``traced``: the result is a quantized activation reported by
    :meth:`Program.trace`. ``export``: maps the stored value to the one users see
    (e.g. NHWC -> NCHW codes); ``None`` means unchanged. ``spec``: ``(kind,
    attributes)``, what the step computes in a form :func:`qjax.save_served` can write
    (:mod:`qjax.flax._steps` for converted Flax models, :mod:`qjax.flax._torch_steps` and
    :mod:`qjax.flax._pt2e_steps` for imported torch / pt2e ones); ``None`` for a step that
    is only a function (it cannot be saved).
    """

    name: str
    fn: Callable[..., Any]
    inputs: tuple[str, ...] = ()
    params: Any = None
    traced: bool = True
    export: Callable[[Any], Any] | None = None
    layer: Layer | None = None
    spec: tuple[str, Mapping[str, Any]] | None = None


def _to_array(v, what: str):
    if isinstance(v, (jax.Array, np.ndarray, np.generic, int, float)):
        return v
    # torch tensors (or anything with the same protocol) without importing torch
    if hasattr(v, "detach") and hasattr(v, "numpy"):
        t = v.detach()
        if getattr(t, "is_quantized", False):
            raise TypeError(f"{what}: quantized torch tensors are not program inputs; pass floats")
        return np.asarray(t.cpu().numpy())
    raise TypeError(f"{what}: expected an array or a torch tensor, got {type(v).__name__}")


class Program:
    """An imported int8 model: ``program(*inputs)`` runs it, ``program.trace(*inputs)``
    returns every quantized activation (module docstring).

    Args:
      steps: the steps in execution order (unique names, not clashing with ``inputs``).
      inputs: names of the input values, in call order.
      output: name(s) of the returned value(s): a string, or a tuple / list / dict of them.
      engine: the torch engine the program was imported for (``import_model`` sets it;
        the parity rulebook reads it), or ``None``.
      level: the CPU level that engine was emulated at (``"avx2"``, ``"avx512"``,
        ``"vnni"``, ``"amx"``; :mod:`qjax.kernels._levels`), or ``None``.
      layout: ``None`` / ``"NCHW"`` (channels first, torch's order) or ``"NHWC"`` (channels
        last, e.g. a traced Flax model); module docstring. Also settable afterwards.

    >>> import jax.numpy as jnp
    >>> from qjax import QuantSpec
    >>> from qjax.kernels import quantize_input, relu, dequantize_output
    >>> qp = QParams(0.5, 128, QuantSpec(signed=False))
    >>> p = Program(
    ...     [Step("q", lambda _, x: quantize_input(x, qp), ("x",)),
    ...      Step("relu", lambda _, q: relu(q), ("q",)),
    ...      Step("out", lambda _, q: dequantize_output(q), ("relu",), traced=False)],
    ...     inputs=("x",), output="out")
    >>> p(jnp.array([-1.0, 0.26, 1.0]))
    Array([0. , 0.5, 1. ], dtype=float32)
    >>> {k: v.values.tolist() for k, v in p.trace(jnp.array([-1.0, 2.0])).items()}
    {'q': [126, 132], 'relu': [128, 132]}
    """

    def __init__(
        self,
        steps: Sequence[Step],
        inputs: Sequence[str],
        output: Any,
        *,
        engine: str | None = None,
        level: str | None = None,
        layout: str | None = None,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"Program: layout must be one of {LAYOUTS}, got {layout!r}")
        steps = tuple(steps)
        inputs = tuple(inputs)
        known = set(inputs)
        if len(known) != len(inputs):
            raise ValueError(f"Program: duplicate input names {inputs}")
        for s in steps:
            if not isinstance(s, Step):
                raise TypeError(f"Program: steps must be Step, got {type(s).__name__}")
            missing = [i for i in s.inputs if i not in known]
            if missing:
                raise ValueError(
                    f"Program: step {s.name!r} reads {missing}, which no earlier step or "
                    "input defines"
                )
            if s.name in known:
                raise ValueError(f"Program: value name {s.name!r} defined twice")
            known.add(s.name)
        for name in jax.tree_util.tree_leaves(output):
            if name not in known:
                raise ValueError(f"Program: output {name!r} is not a step or input name")
        self.steps = steps
        self.inputs = inputs
        self.output = output
        self.engine = engine
        self.level = level  # the CPU level of the engine (qjax.kernels._levels), if any
        self.layout = layout  # None: channels first (torch's order); "NHWC": channels last
        self.params = {s.name: s.params for s in steps}
        self.float_ops: dict[str, str] = {}  # what a converted Flax model left in float
        # refresh(program): run before a call when params (or an entry) was replaced
        self.refresh: Callable[[Program], Any] | None = None
        self._seen: tuple | None = None  # (params, its items) when refresh last ran
        self.compile_count = 0
        self._run = jax.jit(self._make(trace=False))
        self._trace = jax.jit(self._make(trace=True))

    @property
    def layers(self) -> dict[str, Layer]:
        """``{step name: Layer}`` for every step that has one, in step order."""
        return {s.name: s.layer for s in self.steps if s.layer is not None}

    def _make(self, trace: bool):
        def run(params, args):
            self.compile_count += 1  # runs only while jax traces: once per shape
            env = dict(zip(self.inputs, args, strict=True))
            for s in self.steps:
                try:
                    env[s.name] = s.fn(params[s.name], *(env[i] for i in s.inputs))
                except (TypeError, ValueError, NotImplementedError) as e:
                    target = s.layer.target if s.layer is not None else "?"
                    raise type(e)(f"step {s.name!r} ({target}): {e}") from e
            result = jax.tree_util.tree_map(lambda n: env[n], self.output)
            if not trace:
                return result
            out = {}
            for s in self.steps:
                v = env[s.name]
                if s.traced and isinstance(v, QArray):
                    out[s.name] = s.export(v) if s.export is not None else v
            return result, out

        return run

    def _args(self, inputs):
        if len(inputs) != len(self.inputs):
            raise TypeError(
                f"Program takes {len(self.inputs)} input(s) {self.inputs}, got {len(inputs)}"
            )
        return tuple(_to_array(v, f"input {n!r}") for n, v in zip(self.inputs, inputs, strict=True))

    def _at(self, inputs) -> tuple[Program, tuple]:
        """``(program, arrays)``: the program that runs these inputs (this one; a traced
        Flax program picks or lowers one per input shape) and the inputs as arrays."""
        return self, self._args(inputs)

    def _ready(self) -> None:
        """Call ``refresh`` if ``params`` or any entry of it was replaced since it last ran
        (identity; e.g. a fold of requantization coefficients computed from the params)."""
        if self.refresh is None:
            return
        seen, p = self._seen, self.params
        if seen is not None and seen[0] is p and len(p) == len(seen[1]):
            pairs = zip(p.items(), seen[1], strict=True)
            if all(k == k0 and v is v0 for (k, v), (k0, v0) in pairs):
                return
        self.refresh(self)
        self._seen = (self.params, tuple(self.params.items()))

    def __call__(self, *inputs):
        """Run the program: the value(s) named by ``output`` (float when it dequantizes)."""
        program, args = self._at(inputs)
        program._ready()
        return program._run(program.params, args)

    def trace(self, *inputs) -> dict[str, QArray]:
        """``{layer name: QArray}`` for every quantized activation, in graph order."""
        return self.run_traced(*inputs)[1]

    def run_traced(self, *inputs) -> tuple[Any, dict[str, QArray]]:
        """``(output, trace)`` from one compiled program: what ``__call__`` and ``trace``
        return, computed once."""
        program, args = self._at(inputs)
        program._ready()
        result, out = program._trace(program.params, args)
        # jit returns dicts with sorted keys: restore the step order
        return result, {s.name: out[s.name] for s in program.steps if s.name in out}

    def freeze(self) -> FrozenProgram:
        """A :class:`FrozenProgram`: ``program(*inputs)`` with the params, as they are now,
        compiled into the program as constants (its docstring says what that costs).

        >>> import jax.numpy as jnp
        >>> p = Program([Step("y", lambda w, x: x * w, ("x",), jnp.float32(2))], ("x",), "y")
        >>> frozen = p.freeze()
        >>> p.params["y"] = jnp.float32(3)  # later edits reach the program, not the frozen one
        >>> frozen(jnp.ones(2)).tolist(), p(jnp.ones(2)).tolist()
        ([2.0, 2.0], [3.0, 3.0])
        """
        return FrozenProgram(self)

    def __repr__(self) -> str:
        ops = ", ".join(f"{s.name}:{s.layer.op if s.layer else '?'}" for s in self.steps)
        return f"Program(inputs={self.inputs}, steps=[{ops}])"


class FrozenProgram:
    """``Program.freeze()``: ``frozen(*inputs)`` returns what ``program(*inputs)`` returned
    when it was frozen, with the params compiled into the program as constants.

    A :class:`Program` call passes its params to the jitted function: jit flattens the
    params pytree (41 leaves for a 3-layer MLP) and XLA's runtime takes each leaf the
    program reads as an argument buffer. On the 2-core EPYC of the README that costs
    about 20 us a call, more than the int8 work of a small model at batch 1. A frozen
    program closes over the params: XLA holds them as constants of the executable, and
    a call passes only the inputs.

    What it costs: compiling takes longer (about 1 s more per 64 MB of weights on that
    machine), each compiled shape holds its own copy of the weights, and later edits to
    ``program.params`` do not reach it (freeze again). The params are taken when the
    program is frozen; a converted Flax model (``qjax.flax._convert.TracedProgram``)
    called with a new input shape lowers a program for it, whose params are taken on that
    first call. Codes and outputs are the program's: the same steps run on the same
    arrays.

    ``program`` is the program it froze; ``trace`` and exports stay on it.
    """

    def __init__(self, program: Program):
        self.program = program
        self._runs: dict[Program, Callable] = {}
        self._run(program)  # this shape's params: taken now

    def _run(self, program: Program) -> Callable:
        run = self._runs.get(program)
        if run is None:
            program._ready()  # e.g. refolded requantization of edited params
            # leaves, not the dict: a later edit inside an entry must not reach the trace
            leaves, tree = jax.tree_util.tree_flatten(program.params)
            body = program._make(trace=False)
            run = jax.jit(lambda args: body(jax.tree_util.tree_unflatten(tree, leaves), args))
            self._runs[program] = run
        return run

    def __call__(self, *inputs):
        """Run the frozen program: what ``Program.__call__`` returns, params as frozen."""
        program, args = self.program._at(inputs)
        return self._run(program)(args)

    def __repr__(self) -> str:
        return f"FrozenProgram({self.program!r})"
