"""Triton kernels of fastbert, installed as `fastbert.kernels`.

Each module holds the @triton.jit kernels of one op and a host launcher that validates its inputs
and raises ValueError naming the offending size. Nothing here imports the rest of fastbert; the
dispatch between these kernels and the PyTorch reference lives in fastbert.ops.
"""
