"""Device-check helper: does an error raised by a fastbert._C op reach Python as ValueError?"""

import faulthandler
import sys

import torch

import fastbert  # noqa: F401

faulthandler.enable()
sp = torch.tensor([0, 101])
ids = torch.randint(0, 100, (2, 8))


def _embed(input_ids):
    """embedding_gather on a [100, 4] token table and an [8, 4] position table, no LayerNorm."""
    return torch.ops.fastbert.embedding_gather(input_ids, torch.randn(100, 4), torch.randn(8, 4), None, None,
                                               None, None, None, 1e-5, 0.0, 0, 0, -1, -1, True)


cases = {
    "mlm vocab 0 (mlm_args check)": lambda: torch.ops.fastbert.mlm_mask(
        ids, sp, None, 0, 1, 0, 1, 2, 3, 4, 5, -1
    ),
    "mlm bad id (check_ids)": lambda: torch.ops.fastbert.mlm_mask(
        ids + 1000, sp, None, 200, 1, 0, 1, 2, 3, 4, 5, -1
    ),
    "embed 1-D ids (embed_args)": lambda: _embed(ids[0]),
    "embed bad id (check_ids_cpu)": lambda: _embed(ids + 100),
}
for name in sys.argv[1:] or cases:
    print("case:", name, flush=True)
    try:
        cases[name]()
        print("  no error", flush=True)
    except Exception as exc:  # noqa: BLE001
        print("  raised", type(exc).__name__, str(exc).splitlines()[0], flush=True)
