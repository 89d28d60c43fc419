"""Groups finer than a tensor: partitions of parameter elements into units, and bases.

A *partition* splits the elements of its *scope* (a few tensors) into disjoint *units* that
cover them: the heads of an attention layer (a head's rows of Q, K and V and its columns of
O), the neurons of an MLP (a neuron's input row, bias and output column), the rows of an
embedding (one unit per token), or a user's own groups. Elements of the scope that no unit
claims form the unit ``rest`` (the MLP's output bias belongs to no neuron). The units of a
partition therefore sum to the components of its scope exactly (MATH.md §8).

A *basis* partition first rotates one axis of each scope tensor by an orthogonal matrix
``Q`` (row ``k`` = basis vector ``k``) and assigns the rotated elements to units. Per step

    φ·Δ = Σ_k (Qφ)_k · (QΔ)_k        (Qᵀ Q = I on the axis)

so influence splits exactly over basis directions. The discrete Fourier basis over the
token axis of an embedding, with the cosine and sine of one frequency in one unit, gives
the influence per frequency (``fourier_basis``, ``fourier``).

Built-in partitions come from the task (``Task.partitions``); a user's own are a small
JSON-able spec (``partition_from_spec``)::

    {"name": "early heads", "units": {"head 0": {"attn.q.weight": "0:16", "attn.o.weight": ":, 0:16"}},
     "scope": ["attn.k.weight"]}
    {"name": "embed-fourier", "basis": "fourier", "tensors": {"embed.weight": {"axis": 0, "size": 97}}}

Index expressions are NumPy basic indices per axis, comma-separated (``3``, ``0:16``,
``:``, ``::2``). ``UnitMap`` compiles partitions against the flat parameter layout and sums
``φ ⊙ v`` (in the rotated coordinates where a basis applies) into every unit at once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from engine.errors import BadInputError
from engine.model.groups import ParamLayout

KINDS = ("groups", "basis")
REST = "rest"  # the unit of the scope elements no other unit claims
ALL = "all"  # in a list of partitions to compute: every built-in partition of the task
ORTHOGONALITY_TOLERANCE = 1e-10  # largest |QQᵀ − I| entry accepted for a basis
_INDEX_ITEM = re.compile(r"^\s*(-?\d+)?\s*(:\s*(-?\d+)?\s*(:\s*(-?\d+)?\s*)?)?$")


@dataclass(frozen=True)
class TensorUnits:
    """How one scope tensor splits: the unit of each (rotated) element.

    ``unit`` has the tensor's shape; for a basis partition ``basis (L, L)`` rotates axis
    ``axis`` (length ``L``) first, and ``unit`` indexes the rotated elements.
    """

    tensor: str
    unit: np.ndarray                 # int64, the tensor's shape
    axis: int | None = None
    basis: np.ndarray | None = None  # (L, L) float64, orthonormal rows


@dataclass(frozen=True)
class Partition:
    """A named split of its scope tensors into units (``kind`` ``groups`` or ``basis``).

    ``labels`` give each unit's number where it has one (head, neuron, token, frequency),
    in the order of ``units``; ``None`` for the rest and named user groups.
    """

    name: str
    kind: str
    units: tuple[str, ...]
    parts: tuple[TensorUnits, ...]
    labels: tuple[int | None, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BadInputError(f"partition {self.name!r}: kind {self.kind!r} must be one of {', '.join(KINDS)}")
        if not self.name or self.name == ALL:
            raise BadInputError(f"a partition needs a name other than {ALL!r}, got {self.name!r}")
        if len(set(self.units)) != len(self.units):
            raise BadInputError(f"partition {self.name!r} names a unit twice")
        if len(self.labels) != len(self.units):
            raise BadInputError(f"partition {self.name!r}: {len(self.labels)} labels for {len(self.units)} units")
        tensors = [p.tensor for p in self.parts]
        if not tensors or len(set(tensors)) != len(tensors):
            raise BadInputError(f"partition {self.name!r} must cover one or more distinct tensors")
        used = np.zeros(len(self.units), dtype=bool)
        for part in self.parts:
            if part.unit.size and (part.unit.min() < 0 or part.unit.max() >= len(self.units)):
                raise BadInputError(f"partition {self.name!r}: tensor {part.tensor} has elements outside its units")
            used[np.unique(part.unit)] = True
            if (part.basis is None) != (part.axis is None):
                raise BadInputError(f"partition {self.name!r}: tensor {part.tensor} needs both an axis and a basis")
            if part.basis is not None:
                _check_basis(self.name, part)
        if not used.all():
            empty = [u for u, ok in zip(self.units, used, strict=True) if not ok]
            raise BadInputError(f"partition {self.name!r} has units without elements: {', '.join(empty[:5])}")

    @property
    def tensors(self) -> tuple[str, ...]:
        return tuple(p.tensor for p in self.parts)

    def sizes(self) -> np.ndarray:
        """Number of (rotated) elements of each unit."""
        counts = np.zeros(len(self.units), dtype=np.int64)
        for part in self.parts:
            counts += np.bincount(part.unit.reshape(-1), minlength=len(self.units))
        return counts


def _check_basis(name: str, part: TensorUnits) -> None:
    q = part.basis
    length = part.unit.shape[part.axis]
    if q.ndim != 2 or q.shape != (length, length):
        raise BadInputError(f"partition {name!r}: the basis of {part.tensor} must be {length}×{length}, "
                            f"got {q.shape}")
    error = float(np.abs(q @ q.T - np.eye(length)).max())
    if error > ORTHOGONALITY_TOLERANCE:
        raise BadInputError(f"partition {name!r}: the basis of {part.tensor} is not orthonormal "
                            f"(|QQᵀ − I| up to {error:.1e})")


# ----------------------------------------------------------------------------------------------
# Building partitions
# ----------------------------------------------------------------------------------------------


def parse_index(text: str, shape: tuple[int, ...], what: str) -> tuple[int | slice, ...]:
    """``"0:16, :"`` → ``(slice(0, 16), slice(None))``, checked against ``shape``."""
    if not isinstance(text, str):
        raise BadInputError(f"{what}: index {text!r} must be a string such as '0:16, :'")
    items = [item.strip() for item in text.split(",")] if text.strip() else []
    if len(items) > len(shape):
        raise BadInputError(f"{what}: index {text!r} has {len(items)} axes, the tensor only {len(shape)}")
    out: list[int | slice] = []
    for item, size in zip(items, shape, strict=False):
        match = _INDEX_ITEM.match(item)
        if not match or not item:
            raise BadInputError(f"{what}: {item!r} in {text!r} is not an index such as 3, 0:16, : or ::2")
        start, colon, stop, _, step = match.groups()
        if colon is None:
            position = int(start)
            if not -size <= position < size:
                raise BadInputError(f"{what}: index {position} is outside an axis of length {size}")
            out.append(position)
        else:
            if step is not None and int(step) == 0:
                raise BadInputError(f"{what}: a slice step of 0 in {text!r}")
            out.append(slice(None if start is None else int(start), None if stop is None else int(stop),
                             None if step is None else int(step)))
    return tuple(out)


def element_partition(name: str, layout: ParamLayout, units: Mapping[str, Mapping[str, Any]],
                      labels: Sequence[int | None] | None = None, scope: Sequence[str] = ()) -> Partition:
    """Units given as ``{unit: {tensor: index expression or index tuple}}``. The scope is every
    tensor named there or in ``scope``; what no unit claims in it is the unit ``rest``."""
    if not isinstance(units, Mapping) or not units:
        raise BadInputError(f"partition {name!r} needs a non-empty mapping of units")
    shapes = dict(zip(layout.names, layout.shapes, strict=True))

    def unit_map(tensor: str, what: str) -> np.ndarray:
        if tensor not in shapes:
            raise BadInputError(f"partition {name!r}: {what} names {tensor!r}, which is not a trainable tensor "
                                "of the model")
        return assigned.setdefault(tensor, np.full(shapes[tensor], -1, dtype=np.int64))

    names = list(units)
    assigned: dict[str, np.ndarray] = {}
    for u, unit in enumerate(names):
        if not isinstance(units[unit], Mapping) or not units[unit]:
            raise BadInputError(f"partition {name!r}: unit {unit!r} must map tensor names to indices")
        for tensor, index in units[unit].items():
            target = unit_map(tensor, f"unit {unit!r}")
            where = parse_index(index, shapes[tensor], f"partition {name!r}, unit {unit!r}, {tensor}") \
                if isinstance(index, str) else tuple(index)
            if (np.asarray(target[where]) >= 0).any():
                raise BadInputError(f"partition {name!r}: unit {unit!r} overlaps another unit in {tensor}")
            target[where] = u
    for tensor in scope:
        unit_map(tensor, "the scope")
    given = list(labels) if labels is not None else [None] * len(names)
    if any((a < 0).any() for a in assigned.values()):
        if REST in names:
            raise BadInputError(f"partition {name!r}: {REST!r} names the unclaimed elements; rename that unit")
        names.append(REST)
        given.append(None)
        for a in assigned.values():
            a[a < 0] = len(names) - 1
    order = [n for n in layout.names if n in assigned]  # model order
    return Partition(name, "groups", tuple(names), tuple(TensorUnits(t, assigned[t]) for t in order), tuple(given))


def fourier_basis(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The real orthonormal discrete Fourier basis on ``n`` points and each row's frequency.

    Rows: the constant ``1/√n`` (frequency 0), then ``√(2/n) cos(2πft/n)`` and
    ``√(2/n) sin(2πft/n)`` for ``f = 1 … ⌈n/2⌉ − 1``, and for even ``n`` the alternating
    ``(−1)^t/√n`` (frequency ``n/2``). Returns ``Q (n, n)`` and ``frequency (n,)``.
    """
    t = np.arange(n)
    rows, freqs = [np.full(n, 1 / math.sqrt(n))], [0]
    for f in range(1, (n + 1) // 2):
        angle = 2 * math.pi * f * t / n
        rows += [math.sqrt(2 / n) * np.cos(angle), math.sqrt(2 / n) * np.sin(angle)]
        freqs += [f, f]
    if n % 2 == 0:
        rows.append(np.cos(math.pi * t) / math.sqrt(n))
        freqs.append(n // 2)
    return np.stack(rows), np.asarray(freqs, dtype=np.int64)


def fourier(name: str, layout: ParamLayout, tensors: Mapping[str, Mapping[str, Any]]) -> Partition:
    """One unit per frequency of the Fourier basis over ``axis`` of each tensor.

    ``tensors`` maps a tensor to ``{"axis": a, "size": n}`` (and optionally ``"extra"``: names
    of the entries ``n, n+1, …`` of the axis, which keep their own units — an embedding's
    ``=`` token); the basis covers the first ``n`` entries of the axis, default all.
    """
    shapes = dict(zip(layout.names, layout.shapes, strict=True))
    if not isinstance(tensors, Mapping) or not tensors:
        raise BadInputError(f"partition {name!r} needs a non-empty mapping of tensors")
    parts, units, labels = [], [], []
    unit_of: dict[str, int] = {}

    def unit(label: str, number: int | None) -> int:
        if label not in unit_of:
            unit_of[label] = len(units)
            units.append(label)
            labels.append(number)
        return unit_of[label]

    for tensor in [n for n in layout.names if n in tensors] + sorted(set(tensors) - set(shapes)):
        if tensor not in shapes:
            raise BadInputError(f"partition {name!r} names {tensor!r}, which is not a trainable tensor of the model")
        spec = tensors[tensor]
        shape = shapes[tensor]
        axis = spec.get("axis", 0) if isinstance(spec, Mapping) else None
        if not isinstance(axis, int) or not -len(shape) <= axis < len(shape):
            raise BadInputError(f"partition {name!r}: axis {axis!r} of {tensor} (shape {shape}) is not an axis")
        axis %= len(shape)
        length = shape[axis]
        size = spec.get("size", length)
        extra = list(spec.get("extra", [f"{tensor}[{i}]" for i in range(size, length)]))
        if not isinstance(size, int) or not 2 <= size <= length or len(extra) != length - size:
            raise BadInputError(f"partition {name!r}: size {size!r} of {tensor} must lie in 2…{length}, with one "
                                f"'extra' name for each of the {length - size} entries beyond it")
        q_small, freqs = fourier_basis(size)
        q = np.eye(length)
        q[:size, :size] = q_small
        row_unit = [unit(f"freq {f}", int(f)) for f in freqs] + [unit(str(label), None) for label in extra]
        index = np.asarray(row_unit, dtype=np.int64)
        shape_of_index = [1] * len(shape)
        shape_of_index[axis] = length
        parts.append(TensorUnits(tensor, np.broadcast_to(index.reshape(shape_of_index), shape).copy(), axis, q))
    order = sorted(range(len(units)), key=lambda i: (labels[i] is None, labels[i] or 0))  # frequencies first
    remap = np.empty(len(units), dtype=np.int64)
    remap[order] = np.arange(len(units))
    parts = [TensorUnits(p.tensor, remap[p.unit], p.axis, p.basis) for p in parts]
    return Partition(name, "basis", tuple(units[i] for i in order), tuple(parts), tuple(labels[i] for i in order))


def partition_from_spec(spec: Any, layout: ParamLayout) -> Partition:
    """A user's partition from its JSON-able spec (module docstring)."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise BadInputError(f"a partition spec must be a dict with a 'name', got {spec!r}")
    keys = set(spec)
    if "units" in spec:
        if keys - {"name", "units", "scope"}:
            raise BadInputError(f"partition {spec['name']!r} has unknown keys "
                                f"{sorted(keys - {'name', 'units', 'scope'})}; a groups spec has 'name', 'units' "
                                "and optionally 'scope'")
        scope = spec.get("scope", [])
        if not isinstance(scope, list) or not all(isinstance(t, str) for t in scope):
            raise BadInputError(f"partition {spec['name']!r}: 'scope' must be a list of tensor names")
        return element_partition(spec["name"], layout, spec["units"], scope=scope)
    if spec.get("basis") == "fourier":
        if keys - {"name", "basis", "tensors"}:
            raise BadInputError(f"partition {spec['name']!r} has unknown keys "
                                f"{sorted(keys - {'name', 'basis', 'tensors'})}; a basis spec has 'name', "
                                "'basis' and 'tensors'")
        return fourier(spec["name"], layout, spec.get("tensors"))
    raise BadInputError(f"partition {spec['name']!r} needs 'units' (groups of elements) or 'basis': 'fourier'")


def resolve_partitions(requested: Sequence[str | Mapping[str, Any]], builtin: Mapping[str, Partition],
                       layout: ParamLayout) -> list[Partition]:
    """The partitions a configuration asks for: built-in names (``all`` for every one) or specs."""
    out: dict[str, Partition] = {}
    for item in requested:
        if isinstance(item, str):
            if item == ALL:
                chosen = list(builtin.values())
            elif item in builtin:
                chosen = [builtin[item]]
            else:
                known = ", ".join(builtin) or "none for this model"
                raise BadInputError(f"unknown partition {item!r}; built-in partitions: {known} (or {ALL!r}); "
                                    "define others with a spec")
        else:
            chosen = [partition_from_spec(item, layout)]
        for partition in chosen:
            if partition.name in out and out[partition.name] is not partition:
                raise BadInputError(f"two partitions are named {partition.name!r}")
            out[partition.name] = partition
    return list(out.values())


# ----------------------------------------------------------------------------------------------
# Built-in kinds
# ----------------------------------------------------------------------------------------------


def heads(name: str, layout: ParamLayout, q: str, k: str, v: str, o: str, n_heads: int) -> Partition:
    """Attention heads: head ``h`` owns rows ``h·d … (h+1)·d`` of the Q, K and V weights
    ``(d_model, d_in)`` and the same columns of the output weight ``(d_out, d_model)``."""
    shapes = dict(zip(layout.names, layout.shapes, strict=True))
    width = shapes[q][0] // n_heads
    units = {f"head {h}": {q: (slice(h * width, (h + 1) * width),), k: (slice(h * width, (h + 1) * width),),
                           v: (slice(h * width, (h + 1) * width),),
                           o: (slice(None), slice(h * width, (h + 1) * width))} for h in range(n_heads)}
    return element_partition(name, layout, units, labels=list(range(n_heads)))


def neurons(name: str, layout: ParamLayout, w_in: str, b_in: str | None, w_out: str, b_out: str | None) -> Partition:
    """MLP neurons: neuron ``j`` owns row ``j`` of the input weight ``(d_mlp, d_in)``, entry ``j``
    of the input bias and column ``j`` of the output weight ``(d_out, d_mlp)``; the output
    bias is the rest."""
    width = dict(zip(layout.names, layout.shapes, strict=True))[w_in][0]
    units = {}
    for j in range(width):
        owned: dict[str, tuple] = {w_in: (j,), w_out: (slice(None), j)}
        if b_in is not None:
            owned[b_in] = (j,)
        units[f"neuron {j}"] = owned
    return element_partition(name, layout, units, labels=list(range(width)), scope=[b_out] if b_out else [])


def rows(name: str, layout: ParamLayout, tensor: str, labels: Sequence[str]) -> Partition:
    """One unit per row of ``tensor`` (an embedding: one per token), named by ``labels``."""
    shape = dict(zip(layout.names, layout.shapes, strict=True))[tensor]
    if len(labels) != shape[0]:
        raise BadInputError(f"partition {name!r}: {len(labels)} labels for the {shape[0]} rows of {tensor}")
    units = {str(label): {tensor: (i,)} for i, label in enumerate(labels)}
    numbers = [int(label) if str(label).isdigit() else None for label in labels]
    return element_partition(name, layout, units, labels=numbers)


# ----------------------------------------------------------------------------------------------
# Compiled against the flat layout
# ----------------------------------------------------------------------------------------------


@dataclass
class _Rotated:
    offset: int
    shape: tuple[int, ...]
    axis: int
    basis: Tensor   # (L, L) float64
    unit: Tensor    # (size,) global unit ids of the rotated elements


class UnitMap:
    """Partitions compiled against a ``ParamLayout``: unit ``u`` of every partition gets a
    global id (partitions in order, their units in order), and ``sums`` adds ``φ ⊙ v`` into
    every unit (in float64)."""

    def __init__(self, layout: ParamLayout, partitions: Sequence[Partition], device: torch.device | str = "cpu"):
        self.layout = layout
        self.partitions = list(partitions)
        offsets = dict(zip(layout.names, layout.offsets, strict=True))
        shapes = dict(zip(layout.names, layout.shapes, strict=True))
        positions, units, self._rotated = [], [], []
        first = 0
        self.first: list[int] = []
        for partition in self.partitions:
            self.first.append(first)
            for part in partition.parts:
                if part.tensor not in offsets:
                    raise BadInputError(f"partition {partition.name!r} names {part.tensor!r}, which is not a "
                                        "trainable tensor of the model")
                if tuple(part.unit.shape) != tuple(shapes[part.tensor]):
                    raise BadInputError(f"partition {partition.name!r}: {part.tensor} has shape "
                                        f"{shapes[part.tensor]}, its unit map {part.unit.shape}")
                ids = torch.from_numpy(part.unit.reshape(-1) + first)
                if part.basis is None:
                    size = ids.numel()
                    positions.append(torch.arange(offsets[part.tensor], offsets[part.tensor] + size))
                    units.append(ids)
                else:
                    self._rotated.append(_Rotated(offsets[part.tensor], tuple(shapes[part.tensor]), part.axis,
                                                  torch.from_numpy(part.basis).to(device), ids.to(device)))
            first += len(partition.units)
        self.count = first
        self._positions = torch.cat(positions).to(device) if positions else None  # (E,)
        self._units = torch.cat(units).to(device) if units else None              # (E,)

    def sums(self, phi: Tensor, v: Tensor) -> Tensor:
        """``Σ_{i ∈ u} φ[..., i] v[i]`` for every unit ``u`` (rotated coordinates where a basis
        applies): ``phi (n, O, D)``, ``v (D,)`` → ``(U, n, O)`` float64."""
        n, o = phi.shape[0], phi.shape[1]
        out = torch.zeros(n, o, self.count, dtype=torch.float64, device=phi.device)
        if self._positions is not None:
            prod = phi[..., self._positions].double() * v[self._positions].double()  # (n, O, E)
            out.index_add_(2, self._units, prod)
        for r in self._rotated:
            size = math.prod(r.shape)
            phi_r = _rotate(phi[..., r.offset:r.offset + size].double().reshape(n, o, *r.shape), r.basis, 2 + r.axis)
            v_r = _rotate(v[r.offset:r.offset + size].double().reshape(r.shape), r.basis, r.axis)
            out.index_add_(2, r.unit, (phi_r * v_r).reshape(n, o, size))
        return out.permute(2, 0, 1)

    def frame(self, groups: pl.DataFrame) -> pl.DataFrame:
        """``unit_id, partition, kind, unit, label, position, layer, module, tensors, size`` —
        one row per unit; ``layer``/``module`` are the scope's when it lies in one (``groups``
        is ``GroupMap.frame()``)."""
        where = {row["tensor"]: row for row in groups.iter_rows(named=True)}
        rows = []
        for first, partition in zip(self.first, self.partitions, strict=True):
            layers = {where[t]["layer"] for t in partition.tensors}
            modules = {where[t]["module"] for t in partition.tensors}
            layer = layers.pop() if len(layers) == 1 else None
            module = modules.pop() if len(modules) == 1 else None
            sizes = partition.sizes()
            for i, (unit, label) in enumerate(zip(partition.units, partition.labels, strict=True)):
                rows.append({
                    "unit_id": first + i, "partition": partition.name, "kind": partition.kind, "unit": unit,
                    "label": label, "position": i, "layer": layer, "module": module,
                    "tensors": ",".join(partition.tensors), "size": int(sizes[i]),
                })
        return pl.DataFrame(rows, schema=UNIT_SCHEMA)


UNIT_SCHEMA = {"unit_id": pl.Int64, "partition": pl.String, "kind": pl.String, "unit": pl.String,
               "label": pl.Int64, "position": pl.Int64, "layer": pl.String, "module": pl.String,
               "tensors": pl.String, "size": pl.Int64}


def _rotate(x: Tensor, basis: Tensor, axis: int) -> Tensor:
    """``Q`` applied along ``axis`` of ``x``: ``(Qx)[…, k, …] = Σ_t Q[k, t] x[…, t, …]``."""
    return torch.movedim(torch.movedim(x, axis, -1) @ basis.T, -1, axis)
