"""Helpers shared by the strict decoders of protocols/ (no network I/O)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

from protocols.errors import CodecError

__all__ = ["check_exact_keys"]


def check_exact_keys(
    d: Mapping[object, object],
    keys: Sequence[str],
    key_set: Collection[str],
    bad: Callable[[str, str], CodecError],
) -> None:
    """An object must have exactly `keys` (`key_set` is the same keys as a set): the first unknown key
    (sorted) or the first missing one (in `keys` order) is raised as `bad(message, key)`."""
    if d.keys() == key_set:  # the usual case costs one comparison
        return
    unknown = sorted(str(k) for k in d if k not in key_set)
    if unknown:
        raise bad(f"unknown key {unknown[0]!r}", unknown[0])
    for k in keys:
        if k not in d:
            raise bad(f"{k} missing", k)
