"""Ahead-of-time compilation of the Triton kernels for GPUs this machine does not have.

compile_for(kernel, signature, constexprs, arch, num_warps, num_stages, divisible) compiles with
triton.compile(ASTSource, GPUTarget("cuda", arch, 32)) and returns a Report with registers, spills
and shared memory, read from ptxas -v on the generated PTX (the bundled ptxas). Works with no GPU.

variants(family) lists what the AOT test compiles for one kernel file, built from the launch config
lists that file exports (ln_configs, gelu_configs, geglu_configs, FWD_CONFIGS / DKDV_CONFIGS /
DQ_CONFIGS, COLSUM_CONFIG). `python tests/aot.py FAMILY` compiles them for sm_80 and sm_90 and prints
the table; it exits 1 when a compile fails, shared memory is over the limit, or a variant spills that
must not. It must run without TRITON_INTERPRET (the kernels are decorated for compilation); tests/test_aot.py
runs it in a child process.
"""

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ARCHS = (80, 90)
FAMILIES = ("layer_norm", "bias_gelu", "attention", "common", "geglu", "rotary", "segment_pool")
SMEM_LIMIT = {80: 166912, 90: 232448}


@dataclass
class Report:
    name: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int

    def row(self):
        return (f"{self.name:<60} sm_{self.arch}  regs {self.registers:4d}  spill st/ld "
                f"{self.spill_stores}/{self.spill_loads}  smem {self.shared}")


@dataclass
class Variant:
    name: str
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int = 1
    divisible: tuple | None = ()  # integer args compiled as multiples of 16 (pointers always are)
    spills_allowed: bool = False


def _ptxas(arch):
    """The ptxas Triton itself compiles with (its PTX version may be newer than the system's)."""
    from triton.backends.nvidia import compiler as nv

    try:
        return nv.get_ptxas(arch).path  # triton >= 3.5
    except TypeError:
        return nv.get_ptxas().path


def _ptx_target(ptx):
    return re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)


def compile_for(kernel, signature, constexprs, arch, num_warps=4, num_stages=3, name="", divisible=None):
    """divisible: None compiles without specialisation; an iterable of integer argument names
    compiles as a launch does when every pointer and those integers are multiples of 16 (the
    specialisation that vectorises loads; pass () for pointers only)."""
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):  # unwrap @triton.autotune / heuristics
        fn = fn.fn
    sig = {k: v for k, v in signature.items() if k not in constexprs}
    for key in constexprs:
        sig[key] = "constexpr"
    attrs = None
    if divisible is not None:
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
                 if arg in signature and (signature[arg].startswith("*") or arg in divisible)}
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={_ptx_target(ptx)}",
                              path, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    st = re.search(r"(\d+) bytes spill stores", out)
    ld = re.search(r"(\d+) bytes spill loads", out)
    return Report(name or fn.__name__, arch, regs, int(st.group(1)) if st else 0,
                  int(ld.group(1)) if ld else 0, int(k.metadata.shared))


# ------------------------------------------------------------------------------------------------
# what each kernel file compiles
# ------------------------------------------------------------------------------------------------
LN_FWD_SIG = {"X": "*bf16", "R": "*bf16", "W": "*fp32", "B": "*fp32", "Y": "*bf16", "S": "*bf16",
              "MEAN": "*fp32", "RSTD": "*fp32", "SEED": "*i64", "M": "i32", "N": "i32", "eps": "fp32",
              "dropout_p": "fp32"}
LN_BWD_SIG = {"DY": "*bf16", "DS": "*bf16", "S": "*bf16", "W": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32",
              "DSUM": "*bf16", "DX": "*bf16", "DW_PART": "*fp32", "DB_PART": "*fp32", "SEED": "*i64",
              "M": "i32", "N": "i32", "rows_per_program": "i32", "dropout_p": "fp32"}
GELU_FWD_SIG = {"X": "*bf16", "B": "*fp32", "OUT": "*bf16", "SEED": "*i64", "M": "i32", "N": "i32",
                "dropout_p": "fp32"}
GELU_BWD_SIG = {"DY": "*bf16", "X": "*bf16", "B": "*fp32", "DX": "*bf16", "DB_PART": "*fp32",
                "SEED": "*i64", "M": "i32", "N": "i32", "dropout_p": "fp32"}


def _layer_norm():
    """Each (BLOCK_M, BLOCK_N, warps) of ln_configs() with every feature on (the most registers), N
    divisible by 16 or not (spills tolerated above hidden 4096 only), and bias-free (HAS_BIAS off);
    every flag off at the BERT-base config, with and without the bias (the flags only remove code;
    the interpreter tests run every combination)."""
    from fastbert.kernels import layer_norm as K

    out = []
    for block_m, block_n, warps in K.ln_configs():
        for div in ((), ("N",)):
            tag = f"{block_m}x{block_n} w{warps} {'N%16=0' if div else 'N odd'}"
            out.append(Variant(f"ln_fwd {tag} all flags", K._ln_fwd_kernel, LN_FWD_SIG,
                               dict(BLOCK_M=block_m, BLOCK_N=block_n, HAS_RESIDUAL=True, HAS_DROPOUT=True,
                                    STORE_SUM=True, UNBIASED=True, HAS_BIAS=True), warps, 1, div,
                               block_n > 4096))
            out.append(Variant(f"ln_bwd {tag} all flags", K._ln_bwd_kernel, LN_BWD_SIG,
                               dict(BLOCK_M=block_m, BLOCK_N=block_n, HAS_DSUM=True, HAS_DROPOUT=True,
                                    UNBIASED=True, HAS_BIAS=True), warps, 1, div, block_n > 4096))
        # bias-free (ModernBERT), every other flag on, N % 16 = 0
        tag = f"{block_m}x{block_n} w{warps} N%16=0"
        out.append(Variant(f"ln_fwd {tag} all flags, no bias", K._ln_fwd_kernel, LN_FWD_SIG,
                           dict(BLOCK_M=block_m, BLOCK_N=block_n, HAS_RESIDUAL=True, HAS_DROPOUT=True,
                                STORE_SUM=True, UNBIASED=True, HAS_BIAS=False), warps, 1, ("N",),
                           block_n > 4096))
        # sm_90 ptxas fits the 8 x 256 tile without the dB accumulator into 64 registers with a 4-byte
        # spill (the bias tile had kept it at 80 with none): tolerated there, hidden <= 256 only
        out.append(Variant(f"ln_bwd {tag} all flags, no bias", K._ln_bwd_kernel, LN_BWD_SIG,
                           dict(BLOCK_M=block_m, BLOCK_N=block_n, HAS_DSUM=True, HAS_DROPOUT=True,
                                UNBIASED=True, HAS_BIAS=False), warps, 1, ("N",),
                           block_n > 4096 or block_n == 256))
    block_m, block_n, warps = K.ln_settings(768)
    for bias in (True, False):
        name = "no flags" if bias else "no flags, no bias"
        off = dict(HAS_RESIDUAL=False, HAS_DROPOUT=False, STORE_SUM=False, UNBIASED=False, HAS_BIAS=bias)
        out.append(Variant(f"ln_fwd {block_m}x{block_n} {name}", K._ln_fwd_kernel, LN_FWD_SIG,
                           dict(BLOCK_M=block_m, BLOCK_N=block_n, **off), warps, 1, ("N",)))
        off = dict(HAS_DSUM=False, HAS_DROPOUT=False, UNBIASED=False, HAS_BIAS=bias)
        out.append(Variant(f"ln_bwd {block_m}x{block_n} {name}", K._ln_bwd_kernel, LN_BWD_SIG,
                           dict(BLOCK_M=block_m, BLOCK_N=block_n, **off), warps, 1, ("N",)))
    return out


def _bias_gelu():
    """Each (BLOCK_M, BLOCK_N, warps) of gelu_configs(), both GELU forms, N divisible by 16 or not,
    with and without dropout, forward and backward; no spills anywhere."""
    from fastbert.kernels import bias_gelu as K

    out = []
    for block_m, block_n, warps in K.gelu_configs():
        for tanh in (False, True):
            for div in ((), ("N",)):
                for drop in (False, True):
                    tag = (f"{block_m}x{block_n} w{warps} {'tanh' if tanh else 'erf '} "
                           f"{'N%16=0' if div else 'N odd'}{' drop' if drop else ''}")
                    consts = dict(BLOCK_M=block_m, BLOCK_N=block_n, TANH=tanh, HAS_DROPOUT=drop)
                    out.append(Variant(f"gelu_fwd {tag}", K._bias_gelu_fwd_kernel, GELU_FWD_SIG, consts,
                                       warps, 1, div))
                    out.append(Variant(f"gelu_bwd {tag}", K._bias_gelu_bwd_kernel, GELU_BWD_SIG, consts,
                                       warps, 1, div))
    return out


GEGLU_FWD_SIG = {"X": "*bf16", "B": "*fp32", "OUT": "*bf16", "SEED": "*i64", "M": "i32", "F": "i32",
                 "dropout_p": "fp32"}
GEGLU_BWD_SIG = {"DY": "*bf16", "X": "*bf16", "B": "*fp32", "DX": "*bf16", "DB_PART": "*fp32",
                 "SEED": "*i64", "M": "i32", "F": "i32", "dropout_p": "fp32"}


# triton < 3.7 (3.6 is the lent GPU machine's) spills a few bytes in five geglu_bwd variants (at most
# 268/188 bytes stored/loaded, the 32x64 tile with bias and dropout): slower there, not wrong; triton 3.9
# compiles every variant without spills, which is what CI checks
_OLD_TRITON = tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7)


def _geglu():
    """Each (BLOCK_M, BLOCK_N, warps) of geglu_configs(), both GELU forms, forward and backward: bias and
    dropout on with F divisible by 16 or not, and bias-free (ModernBERT) with and without dropout;
    no spills anywhere."""
    from fastbert.kernels import geglu as K

    out = []
    for block_m, block_n, warps in K.geglu_configs():
        for tanh in (False, True):
            for div, bias, drop in ((("F",), True, True), ((), True, True), (("F",), False, False),
                                    (("F",), False, True)):
                tag = (f"{block_m}x{block_n} w{warps} {'tanh' if tanh else 'erf '} "
                       f"{'F%16=0' if div else 'F odd'}{' bias' if bias else ''}{' drop' if drop else ''}")
                consts = dict(BLOCK_M=block_m, BLOCK_N=block_n, TANH=tanh, HAS_BIAS=bias, HAS_DROPOUT=drop)
                out.append(Variant(f"geglu_fwd {tag}", K._geglu_fwd_kernel, GEGLU_FWD_SIG, consts, warps, 1,
                                   div))
                out.append(Variant(f"geglu_bwd {tag}", K._geglu_bwd_kernel, GEGLU_BWD_SIG, consts, warps, 1,
                                   div, spills_allowed=_OLD_TRITON))
    return out


ROTARY_SIG = {"X": "*bf16", "OUT": "*bf16", "COS": "*fp32", "SIN": "*fp32", "SEQINFO": "*i32",
              "sxt": "i32", "sxw": "i32", "sxh": "i32", "sot": "i32", "sow": "i32", "soh": "i32",
              "scp": "i32", "SEQ": "i32"}


def _rotary():
    """Each (BLOCK_T, warps, head dim, rotary half) of rotary_configs(), varlen and padded, forward
    and backward (CONJ); strides compiled as multiples of 16 (as the projection's views); no spills."""
    from fastbert.kernels import rotary as K

    out = []
    for block_t, warps, dim, half in K.rotary_configs():
        for mode in (K.MODE_VARLEN, K.MODE_PADDED):
            for conj in (False, True):
                consts = dict(HEAD_DIM=dim, ROT_HALF=half, BLOCK_R=K.next_power_of_2(half),
                              BLOCK_D=K.next_power_of_2(dim), MODE=mode, CONJ=conj, BLOCK_T=block_t)
                name = f"rotary {'bwd' if conj else 'fwd'} T{block_t} w{warps} D{dim} R{2 * half} MODE={mode}"
                out.append(Variant(name, K._rotary_kernel, ROTARY_SIG, consts, warps, 1,
                                   ("sxt", "sxw", "sxh", "sot", "sow", "soh", "scp")))
    return out


def _segment_pool():
    """The CUDA tile of segment_pool_configs(), mean and max, forward and backward, bf16 input; the
    row stride compiled as a multiple of 16 (the encoder's output); no spills."""
    from fastbert.kernels import segment_pool as K

    fwd_sig = {"X": "*bf16", "Y": "*bf16", "COUNT": "*fp32", "CU": "*i32", "sxt": "i32", "N": "i32"}
    bwd_sig = {"DY": "*bf16", "DX": "*bf16", "X": "*bf16", "Y": "*bf16", "COUNT": "*fp32", "CU": "*i32",
               "sxt": "i32", "N": "i32"}
    out = []
    for block_t, block_n, warps in K.segment_pool_configs():
        for mode, code in K.MODES.items():
            consts = dict(MODE=code, BLOCK_T=block_t, BLOCK_N=block_n)
            for what, kernel, sig in (("fwd", K._segment_pool_fwd_kernel, fwd_sig),
                                      ("bwd", K._segment_pool_bwd_kernel, bwd_sig)):
                out.append(Variant(f"segment_pool {what} {mode} T{block_t} N{block_n} w{warps}", kernel, sig,
                                   consts, warps, 1, ("sxt",)))
    return out


def _common():
    from fastbert.kernels import _common as C

    block_g, block_c, warps = C.COLSUM_CONFIG
    sig = {"PART": "*fp32", "OUT0": "*bf16", "OUT1": "*fp32", "G": "i32", "N": "i32"}
    return [Variant("column_sum (second reduction of dW, dB, dbias)", C.column_sum_kernel, sig,
                    dict(BLOCK_G=block_g, BLOCK_C=block_c), warps, 1, None)]


_ATTN_CONSTS = ("H", "SEQ", "SEQ_BUCKET", "HEAD_DIM", "BLOCK_D", "MODE", "HAS_MASK", "DROPOUT", "DOT_PREC",
                "WINDOW", "BLOCK_M", "BLOCK_N")


def _attention_signature(fn, dtype):
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn
    sig = {}
    for name in fn.arg_names:
        if name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name == "SEQINFO":
            sig[name] = "*i32"
        elif name == "MASK":
            sig[name] = "*u8"
        elif name == "OUT":
            sig[name] = "*i8"
        elif name == "RNG":
            sig[name] = "*i64"
        elif name.isupper() and name not in _ATTN_CONSTS:
            sig[name] = "*" + dtype
        elif name in ("qk_scale", "sm_scale", "drop_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _attention():
    """Every config of FWD/DKDV/DQ_CONFIGS at a head dim (64, else 128) and dtype keep() keeps it for
    (bf16 varlen; the fp32-only configs in fp32 with tf32x3), plus each kernel's head-dim-128 default
    with D 80 padded to 128, a mask and dropout; the sliding window (WINDOW) on each kernel's default
    config at D 64 (bf16 varlen, and padded with a mask and dropout) and D 128; the two small kernels.
    Pointers and the q/k/v/o
    strides are compiled as multiples of 16, as real launches specialise them; spills are reported,
    compile failures and shared memory over the limit fail."""
    from fastbert.kernels import attention as A

    out = []
    for kname, kind, configs in (("_attn_fwd", "fwd", A.FWD_CONFIGS),
                                 ("_attn_bwd_dkdv", "dkdv", A.DKDV_CONFIGS),
                                 ("_attn_bwd_dq", "dq", A.DQ_CONFIGS)):
        kernel = getattr(A, kname)
        for c in configs:
            if A.keep(c, kind, 64, 512, False):
                dims, dtype, prec = (64, 64), "bf16", "ieee"
            elif A.keep(c, kind, 128, 512, False):
                dims, dtype, prec = (128, 128), "bf16", "ieee"
            else:
                dims, dtype, prec = (64, 64), "fp32", "tf32x3"
            consts = dict(HEAD_DIM=dims[0], BLOCK_D=dims[1], MODE=2, HAS_MASK=False, DROPOUT=False,
                          DOT_PREC=prec, WINDOW=False, **c.kwargs)
            out.append(_attn_variant(kname, kernel, dtype, consts, c.num_warps, c.num_stages))
        c = [c for c in configs if A.keep(c, kind, 128, 512, False)][0]
        consts = dict(HEAD_DIM=80, BLOCK_D=128, MODE=1, HAS_MASK=True, DROPOUT=True, DOT_PREC="ieee",
                      WINDOW=False, **c.kwargs)
        out.append(_attn_variant(kname, kernel, "fp16", consts, c.num_warps, c.num_stages))
        # the sliding window: each kernel's default config at D 64 and D 128
        for d in (64, 128):
            c = [c for c in configs if A.keep(c, kind, d, 512, False)][0]
            flags = [(2, False, False)] if d == 128 else [(2, False, False), (1, True, True)]
            for mode, has_mask, drop in flags:
                consts = dict(HEAD_DIM=d, BLOCK_D=d, MODE=mode, HAS_MASK=has_mask, DROPOUT=drop,
                              DOT_PREC="ieee", WINDOW=True, **c.kwargs)
                out.append(_attn_variant(kname, kernel, "bf16", consts, c.num_warps, c.num_stages))
    out.append(_attn_variant("_attn_bwd_pre", A._attn_bwd_pre, "bf16",
                             dict(HEAD_DIM=64, BLOCK_D=64, MODE=2, BLOCK_M=64), 4, 1))
    out.append(_attn_variant("_keep_mask_kernel", A._keep_mask_kernel, "bf16", dict(BLOCK_M=32, BLOCK_N=32),
                             4, 1))
    return out


def _attn_variant(kname, kernel, dtype, consts, warps, stages):
    sig = _attention_signature(kernel, dtype)
    strides = tuple(n for n in sig if re.fullmatch(r"s[qkvodg][bsh]", n))
    name = f"{kname}[{dtype} " + " ".join(f"{k}={v}" for k, v in consts.items() if k != "DOT_PREC") + "]"
    return Variant(f"{name} w{warps} s{stages}", kernel, sig, consts, warps, stages, strides, True)


def variants(family):
    return {"layer_norm": _layer_norm, "bias_gelu": _bias_gelu, "attention": _attention,
            "common": _common, "geglu": _geglu, "rotary": _rotary, "segment_pool": _segment_pool}[family]()


def _compile_one(job):
    family, index, arch = job
    v = variants(family)[index]
    try:
        r = compile_for(v.kernel, v.signature, v.constexprs, arch, v.num_warps, v.num_stages, v.name,
                        v.divisible)
    except Exception as e:  # noqa: BLE001
        return f"{v.name} sm_{arch}  FAILED: {type(e).__name__}: {str(e)[:300]}"
    row = r.row()
    if r.shared > SMEM_LIMIT[arch]:
        row += "   FAILED: shared memory over the limit"
    if (r.spill_stores or r.spill_loads) and not v.spills_allowed:
        row += "   FAILED: register spills"
    return row


def main(family):
    import concurrent.futures as cf
    import multiprocessing as mp

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("tests/aot.py must run without TRITON_INTERPRET")
    jobs = [(family, i, arch) for arch in ARCHS for i in range(len(variants(family)))]
    workers = max(1, min(len(os.sched_getaffinity(0)), 4))
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
        rows = list(ex.map(_compile_one, jobs))
    print(f"{family}: {len(rows)} AOT compiles (registers, spill bytes, shared memory bytes)")
    for row in rows:
        print("  " + row)
    return 1 if any("FAILED" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
