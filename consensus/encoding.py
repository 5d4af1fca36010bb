"""Canonical msgpack encoding of consensus objects, and tagged hashing (PROTOCOL.md §1).

An object encodes as a msgpack array of its fields in declared order; only unsigned
integers, byte strings and arrays appear, never maps, strings or floats. Field types
carry their limits through `typing.Annotated`, so one declaration drives encoding,
strict decoding and the size checks. Decoding rejects anything that is not exactly
the canonical encoding of a valid object: trailing bytes, wrong arity, wrong types,
values out of range, over-long fields, and non-minimal msgpack forms (caught by
re-packing the decoded tree, which is a single C call).

Codecs are generated once per type as straight-line Python (as attrs does), because
encoding sits on every hot path of the node: hashing, storage, gossip.
"""

import dataclasses
import hashlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, NewType, TypeVar

import msgpack

from consensus.errors import DecodeError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class UInt:
    """An unsigned integer of at most `bits` bits, encoded as a msgpack integer."""

    bits: int


@dataclass(frozen=True, slots=True)
class BigUInt:
    """An unsigned integer too large for msgpack, encoded as `size` big-endian bytes."""

    size: int


@dataclass(frozen=True, slots=True)
class Bytes:
    """A byte string whose length is one of `sizes`, or at most `max_len` if sizes is empty."""

    max_len: int
    sizes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class MaxItems:
    """A tuple of at most `n` items."""

    n: int


Hash = NewType("Hash", bytes)
Address = NewType("Address", bytes)

U8 = Annotated[int, UInt(8)]
U16 = Annotated[int, UInt(16)]
U32 = Annotated[int, UInt(32)]
U64 = Annotated[int, UInt(64)]
U256 = Annotated[int, BigUInt(32)]
Hash32 = Annotated[Hash, Bytes(32, (32,))]
OptHash32 = Annotated[bytes, Bytes(32, (0, 32))]
Address20 = Annotated[Address, Bytes(20, (20,))]
PubKey32 = Annotated[bytes, Bytes(32, (32,))]
Sig64 = Annotated[bytes, Bytes(64, (64,))]
Name = Annotated[bytes, Bytes(32)]

ZERO_HASH = Hash(bytes(32))


@dataclass(frozen=True, slots=True)
class _Codec:
    encode: Callable[[Any], Any] | None  # None: the value is already plain
    decode: Callable[[Any, str], Any]


_codecs: dict[Any, _Codec] = {}


def _fail(path: str, what: str) -> typing.NoReturn:
    raise DecodeError(detail=f"{path}: {what}")


def _codec(tp: Any) -> _Codec:
    codec = _codecs.get(tp)
    if codec is None:
        codec = _codecs[tp] = _build(tp)
    return codec


def _build(tp: Any) -> _Codec:
    if typing.get_origin(tp) is Annotated:
        base, *extras = typing.get_args(tp)
        return _build_annotated(base, extras)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _build_union(typing.get_args(tp))
    raise TypeError(f"no canonical encoding for {tp!r}")


def _build_annotated(base: Any, extras: list[Any]) -> _Codec:
    (spec,) = extras
    if isinstance(spec, UInt):
        hi = (1 << spec.bits) - 1

        def dec_uint(v: Any, path: str) -> int:
            if type(v) is not int or not 0 <= v <= hi:
                _fail(path, f"expected uint{spec.bits}")
            return v

        return _Codec(None, dec_uint)
    if isinstance(spec, BigUInt):
        size = spec.size

        def dec_big(v: Any, path: str) -> int:
            if type(v) is not bytes or len(v) != size:
                _fail(path, f"expected {size}-byte integer")
            return int.from_bytes(v, "big")

        return _Codec(lambda n: n.to_bytes(size, "big"), dec_big)
    if isinstance(spec, Bytes):
        sizes, max_len = frozenset(spec.sizes), spec.max_len

        def dec_bytes(v: Any, path: str) -> bytes:
            if type(v) is not bytes:
                _fail(path, "expected bytes")
            if (len(v) not in sizes) if sizes else len(v) > max_len:
                _fail(path, f"bad length {len(v)}")
            return v

        return _Codec(None, dec_bytes)
    if isinstance(spec, MaxItems):
        (item_tp,) = typing.get_args(base)[:1]
        item = _codec(item_tp)
        n, enc_item, dec_item = spec.n, item.encode, item.decode

        def dec_seq(v: Any, path: str) -> tuple:
            if type(v) is not tuple:
                _fail(path, "expected array")
            if len(v) > n:
                _fail(path, f"{len(v)} items, limit {n}")
            return tuple([dec_item(x, path) for x in v])

        if enc_item is None:
            return _Codec(None, dec_seq)
        return _Codec(lambda seq: tuple([enc_item(x) for x in seq]), dec_seq)
    raise TypeError(f"unknown field spec {spec!r}")


def _inline_check(tp: Any, var: str, where: str) -> str | None:
    """Source that validates a plain field in place, or None if it needs its codec."""
    if typing.get_origin(tp) is not Annotated:
        return None
    spec = typing.get_args(tp)[1]
    if isinstance(spec, UInt):
        return (f"    if type({var}) is not int or not 0 <= {var} <= {(1 << spec.bits) - 1}:\n"
                f"        fail('{where}', 'expected uint{spec.bits}')\n")
    if isinstance(spec, Bytes):
        if len(spec.sizes) == 1:
            bad_len = f"len({var}) != {spec.sizes[0]}"
        elif spec.sizes:
            bad_len = f"len({var}) not in {set(spec.sizes)!r}"
        else:
            bad_len = f"len({var}) > {spec.max_len}"
        return (f"    if type({var}) is not bytes:\n        fail('{where}', 'expected bytes')\n"
                f"    if {bad_len}:\n        fail('{where}', f'bad length {{len({var})}}')\n")
    return None


def _build_dataclass(cls: type) -> _Codec:
    # Decoding builds the object with `object.__new__` and the slots' own setters: a
    # frozen dataclass's __init__ goes through object.__setattr__ per field, which was
    # over half the cost of decoding a block. Nothing is lost, since every field is
    # validated here and no consensus class has a __post_init__.
    if hasattr(cls, "__post_init__") or not hasattr(cls, "__slots__"):
        raise TypeError(f"{cls.__name__}: canonical classes are slotted, without __post_init__")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = [f.name for f in dataclasses.fields(cls)]
    env: dict[str, Any] = {"cls": cls, "fail": _fail, "new": object.__new__}
    enc_items, dec_lines = [], []
    for i, name in enumerate(fields):
        where = f"{cls.__name__}.{name}"
        env[f"s_{i}"] = getattr(cls, name).__set__
        check = _inline_check(hints[name], f"a{i}", where)
        codec = _codec(hints[name])
        if check is not None:
            dec_lines.append(check)
        else:
            env[f"d_{i}"] = codec.decode
            dec_lines.append(f"    a{i} = d_{i}(a{i}, '{where}')\n")
        if codec.encode is None:
            enc_items.append(f"o.{name}")
        else:
            env[f"e_{i}"] = codec.encode
            enc_items.append(f"e_{i}(o.{name})")
    n = len(fields)
    names = ", ".join(f"a{i}" for i in range(n))
    src = (
        f"def enc(o):\n    return ({', '.join(enc_items)},)\n"
        f"def dec(v, path):\n"
        f"    if type(v) is not tuple or len(v) != {n}:\n"
        f"        fail(path, 'expected array of {n}')\n"
        f"    {names}, = v\n"
        + "".join(dec_lines)
        + "    o = new(cls)\n"
        + "".join(f"    s_{i}(o, a{i})\n" for i in range(n))
        + "    return o\n"
    )
    exec(compile(src, f"<codec {cls.__name__}>", "exec"), env)
    return _Codec(env["enc"], env["dec"])


def _build_union(members: tuple[type, ...]) -> _Codec:
    """A tagged union: `[KIND, body]`, KIND being each member's class constant."""
    by_kind = {m.KIND: (_codec(m).decode, m.__name__) for m in members}  # type: ignore[attr-defined]
    by_cls = {m: (m.KIND, c.encode) for m, c in  # type: ignore[attr-defined]
              ((m, _codec(m)) for m in members)}

    def enc(o: Any) -> tuple:
        kind, enc_body = by_cls[type(o)]
        return (kind, enc_body(o))

    def dec(v: Any, path: str) -> Any:
        if type(v) is not tuple or len(v) != 2 or type(v[0]) is not int:
            _fail(path, "expected [kind, body]")
        entry = by_kind.get(v[0])
        if entry is None:
            _fail(path, f"unknown kind {v[0]}")
        return entry[0](v[1], entry[1])

    return _Codec(enc, dec)


def to_plain(obj: Any, tp: Any = None) -> Any:
    """The msgpack-ready tree of `obj` (tuples, ints, bytes)."""
    codec = _codec(type(obj) if tp is None else tp)
    return obj if codec.encode is None else codec.encode(obj)


def encode(obj: Any, tp: Any = None) -> bytes:
    """The one canonical encoding of `obj` (of its own type, or of union `tp`)."""
    return msgpack.packb(to_plain(obj, tp))


def decode(tp: type[T] | Any, data: bytes) -> T:
    """Decode `data` as a `tp`, accepting only its canonical encoding; raises DecodeError."""
    if type(data) is not bytes:
        raise DecodeError(detail="expected bytes")
    try:
        raw = msgpack.unpackb(data, use_list=False, strict_map_key=True)
    except msgpack.ExtraData:
        raise DecodeError(detail="trailing bytes") from None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise DecodeError(detail=f"malformed msgpack ({type(exc).__name__})") from None
    obj = _codec(tp).decode(raw, getattr(tp, "__name__", "value"))
    if msgpack.packb(raw) != data:
        raise DecodeError(detail="non-canonical msgpack form")
    return obj


def tagged_hash(tag: str, *items: Any) -> Hash:
    """H(tag, a, b, ...): SHA-256 of the canonical encoding of [tag, a, b, ...].

    Items must already be plain (see `to_plain`); the ASCII tag separates domains.
    """
    return Hash(hashlib.sha256(msgpack.packb((tag, *items))).digest())
