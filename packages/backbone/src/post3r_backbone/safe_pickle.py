"""A restricted unpickler for original CUT3R/TTT3R training checkpoints (torch.load pickle_module).

The original `.pth` is a training dict whose `args` entry is a Hydra/OmegaConf (or argparse)
object. Unpickling it normally imports and runs whatever classes the file names. Here only the
globals needed to rebuild tensors and plain containers resolve to real objects; every other class
or function becomes an inert stand-in that records its arguments and state and executes nothing.
The constructor string can then be read out of the stand-ins as plain data.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from typing import Any

import torch

_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
}


class StandIn:
    """Inert replacement for a class or function named in a pickle; keeps arguments and state."""

    qualified_name = "?"
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        instance = super().__new__(cls)
        instance.args, instance.kwargs, instance.state = args, kwargs, None
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # arguments were kept by __new__
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    # Containers pickled by item (dict/list subclasses) append through these.
    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("values", []).extend(values)

    def __repr__(self) -> str:
        return f"<stand-in for {self.qualified_name}>"


_stand_ins: dict[str, type[StandIn]] = {}


def stand_in(module: str, name: str) -> type[StandIn]:
    qualified = f"{module}.{name}"
    if qualified not in _stand_ins:
        _stand_ins[qualified] = type(name, (StandIn,), {"qualified_name": qualified})
    return _stand_ins[qualified]


class Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return stand_in(module, name)


def load(file: Any, **kwargs: Any) -> Any:
    return Unpickler(file, **kwargs).load()


def walk_strings(value: Any, path: tuple = ()) -> list[tuple[tuple, str]]:
    """Every string inside an unpickled object graph, with the keys/attributes leading to it."""
    found: list[tuple[tuple, str]] = []
    seen: set[int] = set()

    def visit(item: Any, where: tuple) -> None:
        if isinstance(item, str):
            found.append((where, item))
            return
        if id(item) in seen or isinstance(item, torch.Tensor):
            return
        seen.add(id(item))
        if isinstance(item, dict):
            for key, child in item.items():
                visit(child, (*where, key))
        elif isinstance(item, list | tuple | set | frozenset):
            for child in item:
                visit(child, where)
        elif isinstance(item, StandIn):
            for key, child in vars(item).items():
                visit(child, (*where, key))

    visit(value, path)
    return found
