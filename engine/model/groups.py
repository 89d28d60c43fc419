"""Parameters → tensors → modules → layers, and the flat layout the engine computes in.

The engine works on one flat vector of all ``D`` trainable numbers per parameter point
(``ParamLayout``): tensor ``k`` occupies the contiguous slice ``offsets[k] :
offsets[k] + sizes[k]`` in model order. ``GroupMap`` labels every tensor with its module
(the name without its last ``.weight``/``.bias``-style part) and its layer (from
``Task.layer_of``, else the first name component), either of which a dict can override,
and gives the group index of every tensor or element at a chosen granularity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import polars as pl
import torch
from torch import Tensor

from engine.errors import BadInputError

GRANULARITIES = ("element", "tensor", "module", "layer")


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and flat offsets of the trainable tensors, in model order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes):
            raise BadInputError(f"{len(self.names)} parameter names but {len(self.shapes)} shapes")
        if len(set(self.names)) != len(self.names):
            raise BadInputError("parameter names must be unique")

    @classmethod
    def from_params(cls, params: Mapping[str, Tensor]) -> ParamLayout:
        return cls(tuple(params), tuple(tuple(p.shape) for p in params.values()))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, total = [], 0
        for size in self.sizes:
            out.append(total)
            total += size
        return tuple(out)

    @property
    def total(self) -> int:
        """``D``, the number of trainable numbers."""
        return sum(self.sizes)

    def flatten(self, params: Mapping[str, Tensor], dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> Tensor:
        """``{name: (*lead, *shape)} → (*lead, D)``; leading axes must agree across tensors."""
        missing = [n for n in self.names if n not in params]
        if missing:
            raise BadInputError(f"parameter dict lacks {', '.join(missing[:5])}")
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            t = params[name]
            lead = t.shape[: t.dim() - len(shape)]
            parts.append(t.to(device=device, dtype=dtype).reshape(*lead, -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``(*lead, D) → {name: (*lead, *shape)}`` as views (differentiable, vmap-safe)."""
        lead = flat.shape[:-1]
        pieces = torch.split(flat, list(self.sizes), dim=-1)
        return {n: p.reshape((*lead, *s)) for n, p, s in zip(self.names, pieces, self.shapes, strict=True)}

    def expand(self, values: Mapping[str, Tensor | float], dtype: torch.dtype,
               device: torch.device | str) -> Tensor:
        """A per-tensor scalar or full tensor for every name → one flat ``(D,)`` vector."""
        parts = []
        for name, size in zip(self.names, self.sizes, strict=True):
            v = values[name]
            if isinstance(v, Tensor) and v.numel() == size and v.dim() > 0:
                parts.append(v.to(device=device, dtype=dtype).reshape(-1))
            else:
                parts.append(torch.full((size,), float(v), dtype=dtype, device=device))
        return torch.cat(parts)


def default_module(tensor_name: str) -> str:
    """The module owning a tensor: its name without the last component."""
    module, _, _ = tensor_name.rpartition(".")
    return module or tensor_name


def first_component(tensor_name: str) -> str:
    """Default layer label: the first component of the tensor name."""
    return tensor_name.split(".", 1)[0]


@dataclass(frozen=True)
class GroupMap:
    """Module and layer label of every tensor of a ``ParamLayout``."""

    layout: ParamLayout
    modules: tuple[str, ...]
    layers: tuple[str, ...]

    @classmethod
    def build(cls, layout: ParamLayout, layer_of: Callable[[str], str] | None = None,
              modules: Mapping[str, str] | None = None, layers: Mapping[str, str] | None = None) -> GroupMap:
        """Derive labels from names; ``modules``/``layers`` map tensor names to overriding labels."""
        for label, given in (("modules", modules), ("layers", layers)):
            unknown = sorted(set(given or {}) - set(layout.names))
            if unknown:
                raise BadInputError(f"{label} override names unknown tensors: {', '.join(unknown[:5])}")
        layer_fn = layer_of or first_component
        mods = tuple((modules or {}).get(n, default_module(n)) for n in layout.names)
        lays = tuple((layers or {}).get(n, layer_fn(n)) for n in layout.names)
        return cls(layout, mods, lays)

    def tensor_labels(self, granularity: str) -> tuple[str, ...]:
        """The group label of each tensor (tensor granularity: the tensor name)."""
        check_granularity(granularity, allow_element=False)
        if granularity == "tensor":
            return self.layout.names
        return self.modules if granularity == "module" else self.layers

    def labels(self, granularity: str) -> list[str]:
        """Distinct group labels in order of first appearance in the model."""
        return list(dict.fromkeys(self.tensor_labels(granularity)))

    def tensor_index(self, granularity: str) -> list[int]:
        """Group number of each tensor."""
        labels = self.labels(granularity)
        position = {label: i for i, label in enumerate(labels)}
        return [position[label] for label in self.tensor_labels(granularity)]

    def element_index(self, granularity: str, device: torch.device | str = "cpu") -> Tensor:
        """``(D,)`` int64 group number of every flat element."""
        index = torch.tensor(self.tensor_index(granularity), dtype=torch.int64)
        sizes = torch.tensor(self.layout.sizes, dtype=torch.int64)
        return torch.repeat_interleave(index, sizes).to(device)

    def masks(self, granularity: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
        """``(groups, D)`` 0/1 indicator of each group's elements."""
        index = self.element_index(granularity, device)
        n = len(self.labels(granularity))
        return (torch.arange(n, device=device)[:, None] == index[None, :]).to(dtype)

    def sizes(self, granularity: str) -> dict[str, int]:
        """Number of parameter elements in each group."""
        out: dict[str, int] = {}
        for label, size in zip(self.tensor_labels(granularity), self.layout.sizes, strict=True):
            out[label] = out.get(label, 0) + size
        return out

    def frame(self) -> pl.DataFrame:
        """``tensor, module, layer, size, position`` — the store's ``groups`` table."""
        return pl.DataFrame(
            {
                "tensor": list(self.layout.names),
                "module": list(self.modules),
                "layer": list(self.layers),
                "size": list(self.layout.sizes),
                "position": list(range(len(self.layout.names))),
            },
            schema={"tensor": pl.String, "module": pl.String, "layer": pl.String,
                    "size": pl.Int64, "position": pl.Int32},
        )


def check_granularity(granularity: str, allow_element: bool = True) -> None:
    allowed = GRANULARITIES if allow_element else GRANULARITIES[1:]
    if granularity not in allowed:
        raise BadInputError(f"unknown granularity {granularity!r}; choose one of {', '.join(allowed)}")


def aggregate(frame: pl.DataFrame, groups: GroupMap, level: str,
              keys: Sequence[str] = ("step_lo", "step_hi", "test", "output")) -> pl.DataFrame:
    """Sum a tensor-granularity frame (column ``tensor``) to ``module`` or ``layer`` level.

    Every numeric column not in ``keys`` is summed (nulls stay null only if all are null).
    """
    check_granularity(level, allow_element=False)
    if level == "tensor":
        return frame
    labels = groups.frame().select("tensor", level)
    keys = [k for k in keys if k in frame.columns]
    values = [c for c in frame.columns if c not in (*keys, "tensor")]
    joined = frame.join(labels, on="tensor", how="left")
    if joined[level].null_count():
        raise BadInputError(f"frame names tensors that are not in the model: "
                            f"{joined.filter(pl.col(level).is_null())['tensor'].unique().to_list()[:5]}")
    order = {label: i for i, label in enumerate(groups.labels(level))}
    out = joined.group_by([*keys, level], maintain_order=True).agg(
        [pl.when(pl.col(v).is_null().all()).then(None).otherwise(pl.col(v).sum()).alias(v) for v in values]
    )
    return out.sort([*keys, pl.col(level).replace_strict(order, return_dtype=pl.Int64)])
