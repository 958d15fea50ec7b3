"""Key renaming shared by the checkpoint converters (torchvision/timm state_dict -> cnnlab layout).

A converter raises KeyError on a key it does not know: ``load_weights`` tries each family
converter and keeps the one that maps every key, so that is how a layout is recognised.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from cnnlab.models.registry import StateDict


def rename_keys(state_dict: StateDict, rules: Sequence[tuple[str, str]]) -> StateDict:
    """Rename every key by the first matching ``(regex, replacement)``; a key no rule matches raises KeyError."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in rules:
            new, n = re.subn(f"^{pattern}$", repl, key)
            if n:
                out[new] = value
                break
        else:
            raise KeyError(f"unexpected key {key!r}")
    return out


def replace_prefix(key: str, prefixes: Mapping[str, str], layout: str) -> str:
    """``key`` with the first of ``prefixes`` it starts with replaced by that prefix's value.

    A key with none of them raises ``KeyError("not a {layout} key: ...")``.
    """
    for old, new in prefixes.items():
        if key.startswith(old):
            return new + key[len(old):]
    raise KeyError(f"not a {layout} key: {key}")
