"""getenv(name, default=None): os.environ.get for the variables read on every op call.

fastbert's switches (FASTBERT_BACKEND, FASTBERT_POISON, FASTBERT_ATTN_CHECK, TRITON_INTERPRET, ...)
are read at every call, so that a change takes effect at once (tests set them per test with
monkeypatch.setenv). os.environ.get encodes the name and decodes the value on each read, about
0.6 us: a patched 12-layer forward makes some 90 reads. This reads os.environ's own dict (the
mapping os.environ keeps in sync with every change made through it: assignment, del, setdefault,
update, monkeypatch) with the name encoded once, about 0.1 us when the variable is unset (the common
case). A change made behind os.environ's back (os.putenv, C code) is not seen by either. Where the
mapping's internals are not the ones expected, it is os.environ.get itself.
"""

import os

_data = getattr(os.environ, "_data", None)
_encodekey = getattr(os.environ, "encodekey", None)
_decodevalue = getattr(os.environ, "decodevalue", None)


def _fast():
    if not (isinstance(_data, dict) and callable(_encodekey) and callable(_decodevalue)):
        return False
    probe = "FASTBERT_ENV_PROBE_"
    try:  # a write through os.environ must show in _data under the encoded key, and back
        os.environ[probe] = "1"
        seen = _data.get(_encodekey(probe))
        ok = seen is not None and _decodevalue(seen) == "1"
    except Exception:  # noqa: BLE001
        ok = False
    finally:
        os.environ.pop(probe, None)
    return ok and _encodekey(probe) not in _data


if _fast():
    _keys: dict = {}

    def getenv(name, default=None):
        key = _keys.get(name)
        if key is None:
            key = _keys[name] = _encodekey(name)
        raw = _data.get(key)
        return default if raw is None else _decodevalue(raw)
else:  # pragma: no cover - another Python's os.environ
    getenv = os.environ.get
