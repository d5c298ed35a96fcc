"""Fingerprints: the keys under which finesift keeps resumable work and keyed results.

One function, :func:`fingerprint`, hashes an identity (a JSON-able dict: options, seed,
model, ...) and optional binary blobs (token ids, losses) into a short hex key. The key
names a method's state in a work folder (``tov-<key>``, ``harp_runs-<key>.json``), ties
the shards of one run together and tells a benchmark when a method's options changed.

Every key is made by a named *scheme*. ``"v1"`` is the scheme for new keys: sha256 of
canonical JSON (sorted keys, no spaces, UTF-8) that holds the scheme's name itself, then
each blob framed by its type, dtype, shape and length, so two different inputs cannot
concatenate to the same bytes and a later scheme can never collide with it.

The other schemes are frozen copies of the ad-hoc hashes finesift used before there was
one function. Existing work folders, shard runs and committed benchmark results are
named by their values, so each reproduces its old value byte for byte and none of them
may ever change; they cannot hold their own name in the hashed bytes (that would change
every value), so the name lives only at the call site and in :data:`SCHEMES`:

``"run-v0"``
    A method's resumable state (:func:`finesift.methods.base.run_fingerprint`).
    Identity ``{"tag", "options", "seed", "precision", "n_pool", "n_target", "model"}``
    (``model``: the :func:`~finesift.methods.base.model_identity` text, or ``None``),
    hashed as ``f"{tag}|"``, the options as JSON with sorted keys, then
    ``f"{seed}|{precision}|{n_pool}|{n_target}"`` and the model text; blobs: each
    example's ``input_ids`` and ``labels`` in their own dtype. sha256, 16 hex digits.
``"harp-runs-v0"``
    HARP's cache of finished leaf runs (``harp_runs-<key[:16]>.json``, whose
    ``"fingerprint"`` field holds the whole key). Identity ``{"o": training options,
    "seed"}`` as JSON with sorted keys; blobs: the model's target losses (float64,
    rounded to 5 places) and the target's domains (int64). sha256, all 64 hex digits.
``"harp-leaf-v0"``
    One leaf run inside that cache. Identity ``{"seed"}``, hashed as ``str(seed)``;
    blobs: per example its ``input_ids`` as int64 then ``b"|"``. sha256, 32 hex digits.
``"shard-v0"``
    The run a shard belongs to (:mod:`finesift.shards`): the identity as JSON with sorted
    keys, other values as ``str()``. sha256, 24 hex digits.
``"examples-v0"``
    The encoded examples a shard run read (the ``encoded`` entry of the shard identity
    in :mod:`finesift.shards`). No identity (``{}``); blobs: per example its
    ``input_ids`` as int64, ``b"|"``, its ``labels`` as int64, ``b"#"``. sha256, all 64
    hex digits.
``"bench-v0"``
    A benchmark method's options (the hash part of ``MethodSpec.key``,
    ``<label>#<key>``): the options as JSON with sorted keys, other values as ``str()``.
    sha1, 8 hex digits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

CURRENT = "v1"
"""The scheme for new keys."""


@dataclass(frozen=True)
class Scheme:
    """How one scheme turns an identity and blobs into a key.

    Attributes:
        algorithm: the :mod:`hashlib` algorithm.
        digits: hex digits kept (``None``: the whole digest).
        header: the bytes hashed first, made from the identity.
        framed: blobs are hashed with their type, dtype, shape and length (``v1``), or as
            their raw bytes only (the legacy schemes).
    """

    algorithm: str
    digits: int | None
    header: Callable[[Mapping[str, Any]], bytes]
    framed: bool = False


def _canonical_default(o: Any) -> Any:
    """JSON for the few non-JSON types identities hold (those of the store's JSON files,
    numpy booleans and sets); anything else is an error (a ``str()`` fallback could put a
    memory address into a key that must be stable)."""
    from finesift.store.files import _default

    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    try:
        return _default(o)
    except TypeError:
        raise TypeError(f"fingerprint identity holds a {type(o).__name__}, which has no "
                        "canonical JSON form") from None


def _v1_header(identity: Mapping[str, Any]) -> bytes:
    blob = {"fingerprint": "finesift/v1", "identity": identity}
    return json.dumps(blob, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=_canonical_default).encode("utf-8")


def _run_v0_header(identity: Mapping[str, Any]) -> bytes:
    i = identity
    head = (f"{i['tag']}|".encode()
            + json.dumps(i["options"], sort_keys=True).encode()
            + f"{i['seed']}|{i['precision']}|{i['n_pool']}|{i['n_target']}".encode())
    # a context built by hand (no model spec) hashed no model text
    return head + (i["model"].encode() if i.get("model") is not None else b"")


def _sorted_json_header(identity: Mapping[str, Any]) -> bytes:
    return json.dumps(identity, sort_keys=True).encode()


def _sorted_json_str_header(identity: Mapping[str, Any]) -> bytes:
    return json.dumps(identity, sort_keys=True, default=str).encode()


def _harp_leaf_v0_header(identity: Mapping[str, Any]) -> bytes:
    return str(identity["seed"]).encode()


def _no_header(identity: Mapping[str, Any]) -> bytes:
    if identity:
        raise ValueError("this fingerprint scheme hashes blobs only; pass an empty identity")
    return b""


SCHEMES: dict[str, Scheme] = {
    "v1": Scheme("sha256", 24, _v1_header, framed=True),
    "run-v0": Scheme("sha256", 16, _run_v0_header),
    "harp-runs-v0": Scheme("sha256", None, _sorted_json_header),
    "harp-leaf-v0": Scheme("sha256", 32, _harp_leaf_v0_header),
    "shard-v0": Scheme("sha256", 24, _sorted_json_str_header),
    "examples-v0": Scheme("sha256", None, _no_header),
    "bench-v0": Scheme("sha1", 8, _sorted_json_str_header),
}
"""Every scheme by name (see the module docstring). Never change an existing entry: add
a new scheme instead."""


def _blob_bytes(blob: Any, framed: bool) -> bytes:
    """A blob's bytes: ``bytes`` as given, anything else as ``np.asarray(blob)`` in its
    own dtype (the caller fixes the dtype where it matters); with ``framed``, prefixed by
    what it is so that consecutive blobs cannot run into each other."""
    if isinstance(blob, (bytes, bytearray, memoryview)):
        raw = bytes(blob)
        return (f"b{len(raw)}:".encode() + raw) if framed else raw
    arr = np.asarray(blob)
    if arr.dtype == object:
        raise TypeError("fingerprint blobs must be bytes or numeric arrays, not objects")
    raw = arr.tobytes()
    if not framed:
        return raw
    return f"a{arr.dtype.str}{list(arr.shape)}{len(raw)}:".encode() + raw


def fingerprint(identity: Mapping[str, Any], *, version: str = CURRENT,
                blobs: Iterable[Any] = ()) -> str:
    """The hex key of ``identity`` (and ``blobs``) under the scheme ``version``.

    Args:
        identity: what the key stands for, a JSON-able dict whose layout the scheme fixes
            (see the module docstring).
        version: the scheme's name in :data:`SCHEMES`: ``"v1"`` for new keys, one of the
            frozen ``*-v0`` schemes where an existing key must keep its value.
        blobs: bytes or numeric arrays hashed after the identity, in order (read once, so
            a generator over a large pool is fine).

    Raises:
        ValueError: an unknown scheme.
        TypeError: an identity or blob the scheme cannot hash.
    """
    scheme = SCHEMES.get(version)
    if scheme is None:
        raise ValueError(f"unknown fingerprint scheme {version!r}; known: {', '.join(SCHEMES)}")
    h = hashlib.new(scheme.algorithm)
    h.update(scheme.header(identity))
    for blob in blobs:
        h.update(_blob_bytes(blob, scheme.framed))
    digest = h.hexdigest()
    return digest if scheme.digits is None else digest[: scheme.digits]
