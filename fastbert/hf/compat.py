"""What differs between transformers 5.x releases, read from the installed release, not assumed.

The stock forwards fastbert.hf wraps changed their keyword names within 5.x: the embeddings took
`past_key_values_length` up to 5.23 and `cache_length` from 5.24, the encoder and its layers
`past_key_values` (and `cache_position`) before `cache`. The fused forwards therefore take
(*args, **kwargs), name them with the stock forward's own signature (bind), read whichever alias the
release uses, and hand the call on unchanged (super().forward(*args, **kwargs)) whenever they fall back.

Supported: transformers >= 5.0 and < 6 (the major version whose module layout fastbert.hf knows);
CI runs 5.0.0 (the oldest), 5.17.0 (the lent GPU machine's) and the newest pinned release. Another
major version gets one clear error from patch_hf, a 5.x newer than the newest tested a warning.
"""

import inspect
import warnings

import transformers

SUPPORTED = ">=5.0, <6"
TESTED = ("5.0.0", "5.17.0", "5.24.0")
CACHE = ("cache", "past_key_values")  # the KV cache argument, newest name first
CACHE_LENGTH = ("cache_length", "past_key_values_length")  # the embeddings' offset into a cache


def _release(text):
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts + [0] * (3 - len(parts)))


VERSION = _release(transformers.__version__)
_warned = []


def check_version():
    """Raise for a transformers release fastbert.hf does not support; warn (once) for an untested 5.x."""
    if not (5, 0, 0) <= VERSION < (6, 0, 0):
        raise RuntimeError(
            f"fastbert.hf supports transformers {SUPPORTED} (tested: {', '.join(TESTED)}); this is "
            f"transformers {transformers.__version__}. Install a supported release, e.g. "
            f"pip install 'transformers{SUPPORTED.replace(' ', '')}'")
    if VERSION > _release(TESTED[-1]) and not _warned:
        _warned.append(True)
        warnings.warn(f"fastbert.hf: transformers {transformers.__version__} is newer than the newest "
                      f"release it was tested with ({TESTED[-1]}); patch_hf falls back to the stock "
                      "forward for any call it does not recognise", stacklevel=3)


_NAMES = {}


def positional_names(fn, method=True):
    """Names of fn's positional parameters (after self for a method; cached per function)."""
    names = _NAMES.get((fn, method))
    if names is None:
        params = list(inspect.signature(fn).parameters.values())[1 if method else 0:]
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = tuple(p.name for p in params if p.kind in positional)
        _NAMES[fn, method] = names
    return names


def bind(fn, args, kwargs, method=True):
    """{name: value} of a call fn(self, *args, **kwargs) (fn(*args, **kwargs) when not a method), named
    by fn's signature; None when there are more positional arguments than fn names (a call it does
    not recognise)."""
    names = positional_names(fn, method)
    if len(args) > len(names):
        return None
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key in bound:
            return None  # given twice: let the stock forward raise its own TypeError
        bound[key] = value
    return bound


def first(bound, names, default=None):
    """The value of the first of names present in bound (aliases across releases), else default."""
    for name in names:
        if name in bound:
            return bound[name]
    return default
