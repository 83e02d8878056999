"""Search spaces that score millions of candidates per second, with gradients for
differentiable NAS, and multi-objective evolution with Pareto fronts."""

from __future__ import annotations

import itertools
import weakref

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from lowbit import _lowbit
from lowbit._lowbit import DeviceProfile, Graph, LowbitTypeError, LowbitValueError
from lowbit._validate import float_arg, int_arg
from lowbit.nas.cost import METRICS, Cost, _bits, _metric, estimate
from lowbit.nas.device import _device


def _metrics_of(choice: Any, device: DeviceProfile, wb: int, ab: int) -> list[float]:
    if isinstance(choice, Graph):
        choice = estimate(choice, device, wb, ab)
    if isinstance(choice, Cost):
        return [choice.metric(m) for m in METRICS]
    if isinstance(choice, Mapping):
        unknown = set(choice) - set(METRICS)
        if unknown:
            raise LowbitValueError(f"unknown metrics {sorted(map(str, unknown))} in a choice; known: {list(METRICS)}")
        return [float_arg(choice.get(m, 0.0), f"a choice's {m}") for m in METRICS]
    raise LowbitTypeError(f"a choice must be a Graph, a Cost or a dict of metrics, got {type(choice).__name__}")

class SearchSpace:
    """A chain of blocks, each with a few candidate choices whose costs are precomputed.

    ``blocks`` is a list (one per block) of lists of choices; a choice is a :class:`Graph`
    (estimated on ``device`` at ``bits``), a :class:`Cost`, or a dict of metrics. ``bits`` is the
    weight bit width (activations int8 when it is <= 8, else float32) or a ``(weight_bits,
    act_bits)`` pair. ``base`` is the fixed part of the network (stem and head), same forms.
    Latency, energy, FLOPs, parameters and weight bytes add over blocks; peak activation memory
    is the maximum.

    >>> space = SearchSpace([[{"latency_ms": 1.0}, {"latency_ms": 2.0}]] * 3)
    >>> space.evaluate([[0, 1, 1], [0, 0, 0]])["latency_ms"]
    array([5., 3.])
    >>> value, grad = space.expected([[0.5, 0.5]] * 3)
    >>> float(value), grad[0].tolist()
    (4.5, [1.0, 2.0])
    """

    def __init__(
        self,
        blocks: Sequence[Sequence[Any]],
        device: str | DeviceProfile = "cortex-a76",
        bits: int | tuple[int, int] = 32,
        base: Any = None,
    ) -> None:
        if isinstance(bits, tuple):
            if len(bits) != 2:
                raise LowbitValueError(f"bits must be an int or a (weight_bits, act_bits) pair, got {bits!r}")
            wb, ab = (_bits(b, "bits") for b in bits)
        else:
            wb = _bits(bits, "bits")
            ab = 8 if wb <= 8 else 32
        self.device, self.weight_bits, self.act_bits = _device(device), wb, ab
        def listable(v: Any) -> bool:
            return hasattr(v, "__iter__") and not isinstance(v, (str, bytes, Mapping))

        if not listable(blocks):
            raise LowbitTypeError(f"blocks must be a list of blocks, got {type(blocks).__name__}")
        blocks = list(blocks)
        if not all(listable(b) for b in blocks):
            raise LowbitTypeError("blocks must be a list of blocks, each a list of choices")
        blocks = [list(b) for b in blocks]
        if not blocks or not all(blocks):
            raise LowbitValueError("a search space needs at least one block, each with at least one choice")
        self.n_choices = [len(b) for b in blocks]
        costs = np.zeros((len(blocks), max(self.n_choices), len(METRICS)))
        for i, block in enumerate(blocks):
            for j, choice in enumerate(block):
                costs[i, j] = _metrics_of(choice, self.device, wb, ab)
        base_costs = [0.0] * len(METRICS) if base is None else _metrics_of(base, self.device, wb, ab)
        self._costs = costs
        self._core = _lowbit.SpaceCore(costs, self.n_choices, base_costs)
        # A number that names this space where only plain values travel (a torch custom op).
        self._op_id = next(_IDS)
        _SPACES[self._op_id] = self

    @property
    def n_blocks(self) -> int:
        return len(self.n_choices)

    def costs(self, metric: str = "latency_ms") -> np.ndarray:
        """(blocks, max_choices) costs of each choice; NaN where a block has fewer choices."""
        out = self._costs[:, :, METRICS.index(_metric(metric))].copy()
        for b, n in enumerate(self.n_choices):
            out[b, n:] = np.nan
        return out

    def evaluate(self, choices: Any) -> dict[str, np.ndarray]:
        """Metrics of candidates: ``choices`` is an int array (n, blocks) of choice indices;
        returns a dict of (n,) float64 arrays, one per metric."""
        if choices is None or isinstance(choices, (str, bytes, dict)):
            raise LowbitTypeError(f"choices must be an integer array (n, {self.n_blocks}), got {type(choices).__name__}")
        c = np.asarray(choices)
        if c.ndim == 1:
            c = c[None]
        if c.ndim != 2 or (c.size and not np.issubdtype(c.dtype, np.integer)):
            raise LowbitValueError(f"choices must be an integer array (n, {self.n_blocks}), got {c.dtype} {c.shape}")
        out = self._core.evaluate(np.ascontiguousarray(c, dtype=np.int64))
        return {m: out[:, i] for i, m in enumerate(METRICS)}

    def expected(self, probs: Any, metric: str = "latency_ms") -> tuple[Any, np.ndarray]:
        """Expected cost under choice probabilities and its gradient with respect to them.

        ``probs`` is (blocks, max_choices) or a batch (batch, blocks, max_choices); entries past a
        block's number of choices must be 0. Returns ``(value, grad)`` with ``value`` a float
        (or (batch,) array) and ``grad`` shaped like ``probs``.
        """
        if probs is None or isinstance(probs, (str, bytes, dict)):
            raise LowbitTypeError(f"probs must be a float array, got {type(probs).__name__}")
        p = np.asarray(probs)
        if p.dtype.kind not in "fiub":
            raise LowbitTypeError(f"probs must hold real numbers, got {p.dtype}")
        p = p.astype(np.float64)
        single = p.ndim == 2
        if single:
            p = p[None]
        if p.ndim != 3:
            raise LowbitValueError(f"probs must be (blocks, choices) or (batch, blocks, choices), got shape {p.shape}")
        value, grad = self._core.expected(np.ascontiguousarray(p), _metric(metric))
        return (float(value[0]), grad[0]) if single else (value, grad)

    def random(self, n: int, seed: int | None = None) -> np.ndarray:
        """``n`` uniformly random candidates, (n, blocks) int64."""
        rng = np.random.default_rng(_seed(seed))
        n = int_arg(n, "n", 0, None)
        if n * self.n_blocks * 8 > _MAX_BYTES:
            raise LowbitValueError(f"n={n} candidates of {self.n_blocks} blocks would take {n * self.n_blocks * 8} bytes")
        return np.stack([rng.integers(0, k, size=n) for k in self.n_choices], axis=1).astype(np.int64)

    def __repr__(self) -> str:
        return f"SearchSpace({self.n_blocks} blocks, choices={self.n_choices}, device={self.device.name!r}, bits=({self.weight_bits}, {self.act_bits}))"


# Every live SearchSpace by its ``_op_id`` (entries leave with their spaces).
_SPACES: weakref.WeakValueDictionary[int, SearchSpace] = weakref.WeakValueDictionary()
_IDS = itertools.count()


def space_by_id(op_id: int) -> SearchSpace:
    """The live search space whose ``_op_id`` is ``op_id``."""
    space = _SPACES.get(op_id)
    if space is None:
        raise LowbitValueError(f"no live search space has id {op_id}")
    return space


# Arrays lowbit.nas allocates for a request (candidates, populations) stop here: an absurd count
# is refused up front instead of failing (or swapping) halfway.
_MAX_BYTES = 1 << 40


def _seed(seed: Any) -> Any:
    return None if seed is None else int_arg(seed, "seed", 0, None)


@dataclass(frozen=True)
class ParetoFront:
    """Non-dominated feasible candidates found by :func:`evolve`: higher ``fitness``, lower
    ``metrics[objective]``. Sorted by the objective."""

    choices: np.ndarray
    fitness: np.ndarray
    metrics: dict[str, np.ndarray] = field(repr=False)
    objective: str = "latency_ms"
    evaluated: int = 0

    def __len__(self) -> int:
        return len(self.fitness)


def _pareto(fit: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Indices of points no other point beats (fitness >=, cost <=, one strictly)."""
    order = np.lexsort((-fit, cost))
    keep, best = [], -np.inf
    for i in order:
        if fit[i] > best:
            keep.append(i)
            best = fit[i]
    return np.array(keep, dtype=np.int64)


def _ranks(fit: np.ndarray, cost: np.ndarray, violation: np.ndarray) -> np.ndarray:
    """Non-dominated sorting rank (0 = front); infeasible points rank after all feasible ones,
    ordered by violation."""
    n = len(fit)
    rank = np.full(n, -1)
    feasible = violation <= 0
    remaining = np.flatnonzero(feasible)
    r = 0
    while remaining.size:
        front = remaining[_pareto(fit[remaining], cost[remaining])]
        rank[front] = r
        remaining = np.setdiff1d(remaining, front)
        r += 1
    infeasible = np.flatnonzero(~feasible)
    rank[infeasible] = r + np.argsort(np.argsort(violation[infeasible]))
    return rank


def evolve(
    space: SearchSpace,
    fitness: Callable[[np.ndarray], Any],
    constraints: Mapping[str, float] | None = None,
    objective: str = "latency_ms",
    population: int = 64,
    generations: int = 50,
    mutation: float | None = None,
    seed: int | None = 0,
    progress: bool = True,
) -> ParetoFront:
    """Multi-objective evolutionary search: maximise ``fitness`` and minimise ``objective``
    subject to ``constraints`` (upper bounds on metrics, e.g. ``{"latency_ms": 5.0}``).

    ``fitness`` maps an (n, blocks) int array of candidates to n scores (higher is better), so a
    whole generation is scored in one call. Each generation makes ``population`` children by
    tournament selection, uniform crossover and per-block mutation (probability ``mutation``,
    default 1/blocks), scores them with :meth:`SearchSpace.evaluate`, and keeps the best
    ``population`` by non-dominated rank (constraint violations rank last). Returns the Pareto
    front of every feasible candidate seen.

    >>> space = SearchSpace([[{"latency_ms": c, "params": c} for c in (1.0, 2.0, 3.0)]] * 4)
    >>> front = evolve(space, lambda c: c.sum(axis=1), {"latency_ms": 9.0}, generations=10,
    ...                progress=False)
    >>> front.metrics["latency_ms"].max() <= 9.0, front.fitness.max()
    (np.True_, np.float64(5.0))
    """
    if not isinstance(space, SearchSpace):
        raise LowbitTypeError(f"space must be a SearchSpace, got {type(space).__name__}")
    if not callable(fitness):
        raise LowbitTypeError(f"fitness must be callable, got {type(fitness).__name__}")
    if constraints is not None and not isinstance(constraints, Mapping):
        raise LowbitTypeError(f"constraints must be a dict of metric bounds, got {type(constraints).__name__}")
    constraints = {_metric(m, "constraints key"): float_arg(b, f"constraints[{m!r}]", finite=True)
                   for m, b in (constraints or {}).items()}
    _metric(objective, "objective")
    population = int_arg(population, "population", 2, None)
    generations = int_arg(generations, "generations", 0, None)
    if population * space.n_blocks * 8 * 4 > _MAX_BYTES:
        raise LowbitValueError(f"population={population} is too large")
    rng = np.random.default_rng(_seed(seed))
    nb = space.n_blocks
    sizes = np.array(space.n_choices)
    p_mut = 1.0 / nb if mutation is None else float_arg(mutation, "mutation", 0.0, 1.0)

    def score(c: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        f = np.asarray(fitness(c))
        if f.dtype.kind not in "fiub":
            raise LowbitValueError(f"fitness must return {len(c)} finite scores, got {f.dtype}")
        f = f.astype(np.float64).reshape(-1)
        if f.shape != (len(c),) or not np.isfinite(f).all():
            raise LowbitValueError(f"fitness must return {len(c)} finite scores, got shape {f.shape}")
        m = space.evaluate(c)
        v = np.zeros(len(c))
        for k, bound in constraints.items():
            v += np.maximum(m[k] - bound, 0) / max(abs(bound), 1e-12)
        return f, m, v

    pop = space.random(population, seed=int(rng.integers(2**32)))
    f, m, v = score(pop)
    seen_c, seen_f, seen_m, seen_v = [pop], [f], [m], [v]
    steps: Iterable[int] = range(generations)
    if progress:
        try:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="evolving", unit="gen")
        except ImportError:
            pass
    for _ in steps:
        rank = _ranks(f, m[objective], v)
        pick = lambda: np.minimum(*rng.integers(0, len(pop), size=(2, population)))  # noqa: E731
        order = np.argsort(rank, kind="stable")
        a, b = pop[order[pick()]], pop[order[pick()]]
        child = np.where(rng.random((population, nb)) < 0.5, a, b)
        mutate = rng.random((population, nb)) < p_mut
        child = np.where(mutate, (rng.random((population, nb)) * sizes).astype(np.int64), child)
        cf, cm, cv = score(child)
        seen_c.append(child)
        seen_f.append(cf)
        seen_m.append(cm)
        seen_v.append(cv)
        allc = np.concatenate([pop, child])
        allf, allv = np.concatenate([f, cf]), np.concatenate([v, cv])
        allm = {k: np.concatenate([m[k], cm[k]]) for k in m}
        _, uniq = np.unique(allc, axis=0, return_index=True)
        r = _ranks(allf[uniq], allm[objective][uniq], allv[uniq])
        keep = uniq[np.argsort(r, kind="stable")[:population]]
        pop, f, v = allc[keep], allf[keep], allv[keep]
        m = {k: allm[k][keep] for k in allm}
    C = np.concatenate(seen_c)
    F, V = np.concatenate(seen_f), np.concatenate(seen_v)
    M = {k: np.concatenate([s[k] for s in seen_m]) for k in METRICS}
    _, uniq = np.unique(C, axis=0, return_index=True)
    ok = uniq[V[uniq] <= 0]
    front = ok[_pareto(F[ok], M[objective][ok])] if ok.size else ok
    front = front[np.argsort(M[objective][front], kind="stable")]
    return ParetoFront(C[front], F[front], {k: M[k][front] for k in METRICS}, objective, len(C))
