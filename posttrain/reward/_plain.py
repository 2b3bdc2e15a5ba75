"""Plain values across the sandbox boundary: exact builtin types only, as tagged JSON.

Standard library only, and no imports from posttrain: the sandbox harness runs this file's
source (passed in its job) inside an `-I -S` interpreter that cannot import the package, and
the parent imports it normally. One codec for both sides.

`encode` accepts a value only when `type(x) is` one of None, bool, int, float, str, bytes,
list, tuple, dict, set, frozenset, recursively. It never calls a method of the value, so a
subclass or an object with a lying `__eq__` cannot pass as plain data: it is refused. Ints and
floats travel as strings (big ints, nan and inf survive; JSON numbers are never produced, so
the decoder refuses them).

The code reward's judge also passes the program's own objects back to it by handle: `encode`
with `ref` turns a value that is not plain into `{"ref": ref(value)}` (ref raises NotPlain for
anything it does not know), and `decode` with `deref` turns it back. Without them, a "ref" is
refused like any other non-plain value.
"""

MAX_DEPTH = 64
MAX_ITEMS = 100_000


class NotPlain(ValueError):
    """The value is not plain data (wrong type, too deep, too large)."""


def encode(value, ref=None):
    """Tagged-JSON form of a plain value; raises NotPlain otherwise (see `ref` above)."""
    return _encode(value, 0, [0], ref)


def _encode(value, depth, state, ref):
    t = type(value)
    state[0] += 1
    if state[0] > MAX_ITEMS:
        raise NotPlain("more than %d items" % MAX_ITEMS)
    if value is None or t is bool or t is str:
        return value
    if t is int:
        return {"int": str(value)}  # ValueError beyond sys.get_int_max_str_digits: not plain
    if t is float:
        return {"float": repr(value)}
    if t is bytes:
        return {"bytes": value.hex()}
    if depth >= MAX_DEPTH:
        raise NotPlain("nested deeper than %d" % MAX_DEPTH)
    if t is list:
        return [_encode(v, depth + 1, state, ref) for v in value]
    if t is tuple:
        return {"tuple": [_encode(v, depth + 1, state, ref) for v in value]}
    if t is dict:
        return {"dict": [[_encode(k, depth + 1, state, ref), _encode(v, depth + 1, state, ref)] for k, v in value.items()]}
    if t is set:
        return {"set": [_encode(v, depth + 1, state, ref) for v in value]}
    if t is frozenset:
        return {"frozenset": [_encode(v, depth + 1, state, ref) for v in value]}
    if ref is not None:
        return {"ref": ref(value)}
    raise NotPlain("not a plain value")


def decode(data, _depth=0, deref=None):
    """The value an `encode` result stands for; raises ValueError on anything else."""
    if _depth > MAX_DEPTH + 1:
        raise ValueError("nested too deep")
    if data is None or type(data) is bool or type(data) is str:
        return data
    if type(data) is list:
        return [decode(v, _depth + 1, deref) for v in data]
    if type(data) is dict and len(data) == 1:
        ((tag, body),) = data.items()
        if tag == "int" and type(body) is str:
            return int(body)
        if tag == "float" and type(body) is str:
            return float(body)
        if tag == "bytes" and type(body) is str:
            return bytes.fromhex(body)
        if tag == "ref" and type(body) is int and deref is not None:
            try:
                return deref(body)
            except KeyError:
                raise ValueError("unknown handle") from None
        if type(body) is list:
            if tag == "tuple":
                return tuple(decode(v, _depth + 1, deref) for v in body)
            if tag == "set":
                return set(decode(v, _depth + 1, deref) for v in body)  # TypeError: unhashable
            if tag == "frozenset":
                return frozenset(decode(v, _depth + 1, deref) for v in body)
            if tag == "dict" and all(type(p) is list and len(p) == 2 for p in body):
                return {decode(k, _depth + 1, deref): decode(v, _depth + 1, deref) for k, v in body}
    raise ValueError("not an encoded plain value")
