"""Keep checking a config after its first schema errors, so that one run reports them all.

``Pruner`` takes out what the schema refused (a list item is dropped, a mapping is emptied,
any other value removed so its default applies) and remembers where each surviving list item
came from, so that errors found later (cross-checks, warnings) still name the key and line of
the file as written. ``did_you_mean`` suggests the nearest known key for an unknown one.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel

Loc = tuple[str | int, ...]


def related(a: Loc, b: Loc) -> bool:
    """One location is the other or contains it (an error there explains the other)."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


class Pruner:
    def __init__(self, data: dict) -> None:
        self.data = copy.deepcopy(data)
        self._origins: dict[int, tuple[list, list[int]]] = {}  # id(list) -> (the list, original indices)

    def original(self, loc: Loc) -> Loc:
        """``loc`` in the pruned data -> the same place in the file as written."""
        node: Any = self.data
        out: list[str | int] = []
        for part in loc:
            if isinstance(node, list) and isinstance(part, int):
                kept = self._origins.get(id(node))
                out.append(kept[1][part] if kept and part < len(kept[1]) else part)
                node = node[part] if part < len(node) else None
            else:
                out.append(part)
                node = node.get(part) if isinstance(node, dict) else None
        return tuple(out)

    def prune(self, locs: list[Loc]) -> bool:
        """Take out the value at each location; False when nothing could be taken out."""
        changed = False
        dropped: dict[int, tuple[list, set[int]]] = {}
        for loc in sorted(set(locs), key=len):
            while loc:
                parent, key = self._at(loc[:-1]), loc[-1]
                if isinstance(parent, dict) and key in parent:
                    if isinstance(parent[key], dict) and parent[key]:
                        parent[key] = {}  # e.g. a profile that is two kinds at once: its defaults
                    else:
                        del parent[key]
                    changed = True
                elif isinstance(parent, list) and isinstance(key, int) and key < len(parent):
                    dropped.setdefault(id(parent), (parent, set()))[1].add(key)
                    changed = True
                elif isinstance(parent, dict):
                    loc = loc[:-1]  # a required key is missing: the mapping holding it goes
                    continue
                break
        for parent, gone in dropped.values():
            kept = self._origins.get(id(parent), (parent, list(range(len(parent)))))[1]
            self._origins[id(parent)] = (parent, [o for i, o in enumerate(kept) if i not in gone])
            parent[:] = [v for i, v in enumerate(parent) if i not in gone]
        return changed

    def _at(self, loc: Loc) -> Any:
        node: Any = self.data
        for part in loc:
            if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                return None
        return node


def did_you_mean(model: type[BaseModel], loc: Loc) -> str | None:
    """The known key nearest to the unknown key at ``loc`` (a typo's likely meaning), if any."""
    keys = known_keys(model, loc[:-1])
    match = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
    return match[0] if match else None


def known_keys(model: type[BaseModel], loc: Loc) -> list[str]:
    """The keys the schema accepts in the mapping at ``loc``."""
    tp: Any = model
    for part in loc:
        tp = _step(_strip(tp), part)
        if tp is None:
            return []
    tp = _strip(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [field.alias or name for name, field in tp.model_fields.items()]
    return []


def _strip(tp: Any) -> Any:
    """X from ``X | None`` and ``Annotated[X, ...]``."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _step(tp: Any, part: str | int) -> Any:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        for name, field in tp.model_fields.items():
            if part in (name, field.alias):
                return field.annotation
        return None
    origin = typing.get_origin(tp)
    if origin is list and isinstance(part, int):
        return typing.get_args(tp)[0]
    if origin is dict and isinstance(part, str):
        return typing.get_args(tp)[1]
    return None
