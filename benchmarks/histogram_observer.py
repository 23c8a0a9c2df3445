"""qjax ``observers.histogram`` vs torch ``HistogramObserver``: wall time, one process.

Workload (per repeat, per distribution): a fresh observer, ``--batches`` updates with
``--shape`` float32 batches, then one ``calculate_qparams`` / ``qparams``. The qjax
update and qparams are jitted once and compiled before timing (compile time is
reported separately); every repeat times the steady state, torch and qjax interleaved,
and the medians are reported with their ratio (torch time / qjax time = qjax speedup).

torch runs with ``torch.set_num_threads(os.cpu_count())`` and ``OMP_WAIT_POLICY=PASSIVE``
(set before torch is imported unless already set): with the default active wait,
OpenMP workers spinning next to JAX's threads on a small machine made torch's
forward 10x slower and erratic, which would flatter qjax.

    python benchmarks/histogram_observer.py              # all distributions
    python benchmarks/histogram_observer.py --dists normal --repeats 11

``QJAX_BENCH_QUICK=1`` (``qjax bench --quick``): 3 repeats, normal and lognormal only.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import _timing  # noqa: E402  (benchmarks/_timing.py: the shared machine line)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.ao.quantization import HistogramObserver  # noqa: E402

import qjax  # noqa: E402

DISTS = {
    "normal": lambda rng, s: rng.standard_normal(s),
    "lognormal": lambda rng, s: rng.lognormal(0.0, 1.0, s),
    "student_t3": lambda rng, s: rng.standard_t(3, s),
    "bimodal": lambda rng, s: np.where(
        rng.random(s) < 0.3, rng.normal(-3.0, 0.5, s), rng.normal(2.0, 1.0, s)
    ),
}


def machine_lines() -> str:
    cap = torch.backends.cpu.get_cpu_capability()
    return (
        f"machine: {_timing.machine_line()}; platform.processor()="
        f"{platform.processor() or platform.machine()!r}, cpu_count={os.cpu_count()}\n"
        f"torch {torch.__version__} ({cap}), torch.set_num_threads({torch.get_num_threads()}), "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )


def run_torch(batches):
    obs = HistogramObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    t0 = time.perf_counter()
    for x in batches:
        obs(x)
    t1 = time.perf_counter()
    scale, zp = obs.calculate_qparams()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, (float(scale), int(zp))


def run_qjax(obs, update, qparams, batches):
    t0 = time.perf_counter()
    state = obs.init(batches[0])
    for x in batches:
        state = update(state, x)
    jax.block_until_ready(state)
    t1 = time.perf_counter()
    qp = jax.block_until_ready(qparams(state))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, (float(qp.scale), int(qp.zero_point))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_dists = "normal,lognormal" if _timing.quick() else ",".join(DISTS)
    p.add_argument("--dists", default=default_dists, help="comma-separated: " + ",".join(DISTS))
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--shape", default="256,1024")
    p.add_argument("--repeats", type=int, default=3 if _timing.quick() else 7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.set_num_threads(os.cpu_count() or 1)
    warnings.filterwarnings("ignore", module="torch.ao")
    print(machine_lines())
    print(_timing.load_line())
    print(
        f"workload: {args.batches} batches of {shape} float32, update each + one qparams; "
        f"median of {args.repeats} interleaved repeats"
    )

    spec = qjax.QuantSpec(bits=8, signed=False)  # torch.quint8, per_tensor_affine
    obs = qjax.observers.histogram(spec, compat="torch")
    update = jax.jit(obs.update)
    qparams = jax.jit(obs.qparams)
    rng = np.random.default_rng(args.seed)
    header = (
        f"{'dist':11s} {'torch ms':>9s} {'(upd+qp)':>15s} {'qjax ms':>8s} "
        f"{'(upd+qp)':>13s} {'speedup':>8s}  qparams equal"
    )
    print(header)
    for name in args.dists.split(","):
        data = [DISTS[name](rng, shape).astype(np.float32) for _ in range(args.batches)]
        t_batches = [torch.from_numpy(x) for x in data]
        j_batches = [jax.block_until_ready(jnp.asarray(x)) for x in data]
        t0 = time.perf_counter()
        run_qjax(obs, update, qparams, j_batches)  # compiles update (all branches) + qparams
        compile_s = time.perf_counter() - t0
        run_torch(t_batches)  # warm-up
        rows = {"torch": [], "qjax": []}
        for _ in range(args.repeats):
            rows["torch"].append(run_torch(t_batches))
            rows["qjax"].append(run_qjax(obs, update, qparams, j_batches))
        med = {
            k: [statistics.median(r[i] for r in v) * 1e3 for i in (0, 1)] for k, v in rows.items()
        }
        tot = {k: statistics.median((r[0] + r[1]) for r in v) * 1e3 for k, v in rows.items()}
        equal = rows["torch"][-1][2] == rows["qjax"][-1][2]
        print(
            f"{name:11s} {tot['torch']:9.2f} ({med['torch'][0]:6.2f}+{med['torch'][1]:6.2f}) "
            f"{tot['qjax']:8.2f} ({med['qjax'][0]:5.2f}+{med['qjax'][1]:5.2f}) "
            f"{tot['torch'] / tot['qjax']:7.1f}x  {equal}  "
            f"[first qjax run incl. compile {compile_s:.2f} s]"
        )
        _timing.bench_line(
            "histogram_observer",
            f"{name}, {args.batches}x{args.shape} + qparams",
            tot["torch"] / tot["qjax"],
            "torch HistogramObserver",
            ">= 10x",
        )


if __name__ == "__main__":
    main()
