"""Every kernel source compiles under plain nvcc for sm_90a, with no register spills and no stack frame, and
exports exactly the kernels whose signatures ``_launch.signatures`` reads (the ones the wrappers launch).

Each ``cuda/*.cu`` file is taken as NVRTC sees it (``_build.source``: local headers inlined) and compiled to a cubin
with the project's NVRTC options and ``-gencode=arch=compute_90a,code=sm_90a`` (``_ptxas_report.nvcc_flags``; see
docs/design.md, "Building and launching kernels": ``-arch=sm_90a -c`` runs a plain compute_90 pass that rejects
sm_90a instructions). ptxas' ``-v`` report gives registers, shared memory, stack frame and spills per function;
spills or a stack frame mean a register array went to local memory, a silent slowdown that these tests turn into a
failure, as is a note that ptxas serialises a kernel's warpgroup MMAs (C7515, C7518: see cuda/attention_wgmma.cuh).
decode.cu and decode_split.cu are compiled by their own tests (same flags, with their register budgets), not again
here.
Files compile in parallel (CI has 2 cores); run with ``-s`` to see the resource table. Build options that
select another module of a source without renaming its kernels are compiled too, for one head dim to keep CI
short: the attention forward's fp32-partial fallback (``-DMOBA_PARTIAL_FP32=1``), the backward's dQ loop
not unrolled (``-DMOBA_BWD_DQ_UNROLL=1``; the default unrolls it by two at head dim 128), the forward's
measurement option (``-DMOBA_TPC=8``) and the wgmma backward's build options
(``_cuda_backward.WGMMA_BUILD_OPTIONS``, in the host emulation's three sets, with small spill allowances:
``_build_options.py``) and the wgmma router's (``_cuda_routing.WGMMA_BUILD_OPTIONS``).

The CPU tests below tie the Python wrappers to the CUDA entry points without a compiler: every kernel name
the wrappers build (string literals and f-strings in ``mobalab.kernels``) has a literal signature, every
entry point is launched by some wrapper, and the macro expansion that reads instantiated signatures works.
Head dims: every kernel family is instantiated for the same head dims (the ``_d<D>`` field of its names),
and every head dim a wrapper declares supported (``SUPPORTED_HEAD_DIMS`` in ``mobalab.kernels``) is among
them; ``-DMOBA_HEAD_DIM=d`` (one NVRTC module per head dim) keeps exactly head dim d and the head-dim-free
kernels.
"""

from __future__ import annotations

import ast
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import mobalab.kernels
from mobalab.kernels import _cuda_attention, _cuda_backward, _cuda_routing
from mobalab.kernels._build import CUDA_DIR, source
from mobalab.kernels._launch import _SCALAR_TYPES, TENSOR_MAP, _parse_signatures, signatures

sys.path.insert(0, str(Path(__file__).parent))
from _background import background_fixture  # noqa: E402
from _build_options import BWD_OPTION_SETS, BWD_SPILL_ALLOWANCE  # noqa: E402
from _ptxas_report import ENTRY, nvcc_flags, parse_ptxas, serialized_wgmma  # noqa: E402

CU_FILES = sorted(p.name for p in CUDA_DIR.iterdir() if p.name.endswith(".cu"))
# compiled, with the same flags, by tests of their own that check their register budgets too (test_decode_compile.py,
# test_decode_split_compile.py): not compiled a second time here
OWN_COMPILE_TESTS = {"decode.cu": "test_decode_compile.py", "decode_split.cu": "test_decode_split_compile.py"}
COMPILED_HERE = [name for name in CU_FILES if name not in OWN_COMPILE_TESTS]
PY_SOURCES = sorted(Path(mobalab.kernels.__file__).parent.rglob("*.py"))
# (source, defines) of the non-default modules: the fp32-partial attention forward at the benchmark head dim
FALLBACK_HEAD_DIM = 128
FALLBACK_BUILDS = [(src, (*_cuda_attention.partial_defines("fp32"), f"MOBA_HEAD_DIM={FALLBACK_HEAD_DIM}"))
                   for src in (_cuda_attention.SOURCE, _cuda_attention.WGMMA_SOURCE)]
# and the backward's build option: the dQ loop not unrolled (the default unrolls it by 2 at head dim 128)
FALLBACK_BUILDS += [(_cuda_backward.SOURCE, ("MOBA_BWD_DQ_UNROLL=1", f"MOBA_HEAD_DIM={FALLBACK_HEAD_DIM}"))]
# and the forward's measurement option: 8 tiles per resident CTA (scripts/bwd_step_ab.py --compare tpc)
FALLBACK_BUILDS += [(_cuda_attention.SOURCE, ("MOBA_TPC=8", f"MOBA_HEAD_DIM={FALLBACK_HEAD_DIM}"))]
# and the wgmma backward's build options, in the host emulation's sets (_build_options.BWD_OPTION_SETS), with the
# spill bytes each may take
SPILL_ALLOWANCE = {(_cuda_backward.WGMMA_SOURCE, (*options, f"MOBA_HEAD_DIM={FALLBACK_HEAD_DIM}")):
                   BWD_SPILL_ALLOWANCE[key] for key, options in BWD_OPTION_SETS.items()}
FALLBACK_BUILDS += list(SPILL_ALLOWANCE)
# and the wgmma router's build options, and both routers' build for centroid_precision "input"
FALLBACK_BUILDS += [(_cuda_routing.WGMMA_SOURCE, (option, f"MOBA_HEAD_DIM={FALLBACK_HEAD_DIM}"))
                    for option in (*_cuda_routing.WGMMA_BUILD_OPTIONS, _cuda_routing.INPUT_CENTROIDS_DEFINE)]
FALLBACK_BUILDS += [("topk.cu", (_cuda_routing.INPUT_CENTROIDS_DEFINE, f"MOBA_HEAD_DIM={FALLBACK_HEAD_DIM}"))]
BUILDS = [(name, ()) for name in COMPILED_HERE] + FALLBACK_BUILDS

_HEAD_DIM = re.compile(r"_d(\d+)(?=_|$)")


def _compile(build: tuple[str, tuple[str, ...]]) -> tuple[int, str]:
    name, defines = build
    nvcc = shutil.which("nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / name
        src.write_text(source(name))
        proc = subprocess.run([nvcc, *nvcc_flags(), *(f"-D{d}" for d in defines), "-o", str(src.with_suffix(".cubin")),
                               str(src)], capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def _compile_all() -> dict[tuple[str, tuple[str, ...]], tuple[int, str]]:
    """``{(source, defines): (nvcc return code, log)}`` for every build in BUILDS."""
    workers = max(1, min(len(BUILDS), os.cpu_count() or 1))
    # the builds with the most kernels first, so that the longest compiles do not start last (a fallback
    # build has one head dim: about a fifth of its source's kernels)
    order = sorted(BUILDS, key=lambda b: -len(signatures(b[0])) / (5 if b[1] else 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(order, pool.map(_compile, order), strict=True))


# made in the background once the tests are collected (_background), while the tests before these run
compiled = background_fixture("compiled", _compile_all)


def _check_build(label: str, rc: int, log: str, exported: set[str], spill_allowance: int = 0) -> None:
    """nvcc succeeded, the compiled entry points are exactly ``exported``, none has spills or a stack frame (beyond
    ``spill_allowance`` bytes of spill stores and loads with the stack frame they need)."""
    assert rc == 0, f"nvcc failed on {label}:\n{log}"
    funcs = parse_ptxas(log)
    entries = ENTRY.findall(log)
    assert entries, f"{label}: no kernel entry points in the ptxas report:\n{log}"
    # the parsed signatures are exactly the compiled entry points: none missed, none invented
    assert sorted(entries) == sorted(exported), f"{label}: ptxas entries differ from _launch.signatures"
    print(f"\n{label}: {'kernel':<40} {'regs':>5} {'smem':>6} {'stack':>6} {'spill':>6}")
    for fn in entries:
        r = funcs[fn]
        print(f"{'':<{len(label) + 2}}{fn:<40} {r.get('registers', 0):>5} {r.get('smem', 0):>6} "
              f"{r.get('stack', 0):>6} {r.get('spill_stores', 0) + r.get('spill_loads', 0):>6}")
    bad = {fn: r for fn, r in funcs.items()
           if r.get("spill_stores", 0) + r.get("spill_loads", 0) > spill_allowance
           or (r.get("stack", 0) and not spill_allowance)}
    assert not bad, f"{label}: stack frame or register spills: {bad}"
    serial = serialized_wgmma(log)
    assert not serial, f"{label}: ptxas serialises the warpgroup MMAs of {serial}"


def test_there_are_kernel_sources():
    assert "topk.cu" in CU_FILES and "centroids.cu" in CU_FILES


def test_parse_ptxas_reads_spills_and_registers():
    log = (
        "ptxas info    : Compiling entry function 'kern' for 'sm_90a'\n"
        "ptxas info    : Function properties for kern\n"
        "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]\n"
    )
    assert parse_ptxas(log) == {
        "kern": dict(stack=16, spill_stores=8, spill_loads=4, registers=255, smem=4096)
    }


def test_serialized_wgmma_notes_are_found():
    log = (
        "ptxas info    : (C7518) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
        "program dependence on compiler-inserted WG.DP in divergent path in the function 'moba_attn_wg_x'\n"
        "ptxas info    : (C7517) warpgroup.wait is injected in around line 12 by compiler to allow use of registers "
        "defined by GMMA in function 'moba_topk_wg_x'\n"
        "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non "
        "wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in "
        "the function 'k2'\n"
    )
    assert serialized_wgmma(log) == [("C7518", "moba_attn_wg_x"), ("C7515", "k2")]
    assert serialized_wgmma("ptxas info    : Used 168 registers\n") == []


@pytest.mark.nvcc
@pytest.mark.parametrize("name", COMPILED_HERE)
def test_compiles_without_spills(name, compiled):
    _check_build(name, *compiled[(name, ())], set(signatures(name)))


@pytest.mark.parametrize("name", sorted(OWN_COMPILE_TESTS))
def test_sources_left_out_are_compiled_by_their_own_tests(name):
    text = (Path(__file__).parent / OWN_COMPILE_TESTS[name]).read_text()
    assert f'entry_report("{name}"' in text and "@pytest.mark.nvcc" in text


@pytest.mark.nvcc
@pytest.mark.parametrize("build", FALLBACK_BUILDS, ids=[" ".join((n, *d)) for n, d in FALLBACK_BUILDS])
def test_fallback_modules_compile_without_spills(build, compiled):
    """A non-default module (the fp32-partial forward, the unrolled dQ loop): same entry points as the default
    module at its head dim (the launch plans use the same names and signatures), no spills, no stack frame."""
    name, defines = build
    dim = next(int(d.split("=")[1]) for d in defines if d.startswith("MOBA_HEAD_DIM="))
    _check_build(" ".join((name, *(f"-D{d}" for d in defines))), *compiled[build],
                 {k for k in signatures(name) if head_dim(k) in (None, dim)},
                 SPILL_ALLOWANCE.get(build, 0))


# ---- signatures: macro-instantiated entry points, checked without a compiler ----

def test_parse_signatures_expands_kernel_macros():
    text = r'''
    #define N_THREADS 128
    // a kernel-defining macro: parameter types and the name come from the call
    #define K(NAME, T, D)                                                           \
      extern "C" __global__ void __launch_bounds__(N_THREADS) NAME(const T* __restrict__ x, \
          long long n, float s) { body<T, D>(x, n, s); }
    #define PASTE(TAG, T) extern "C" __global__ void k_##TAG(T* y, int c) { }
    K(k_bf16_d64, __nv_bfloat16, 64)
    K(k_f16_d128, __half, (128))
    PASTE(fp16, __half)
    /* K(k_commented_out, float, 1) */
    extern "C" __global__ void plain(const int* a, int b) { }
    '''
    sigs = _parse_signatures(text)
    assert sorted(sigs) == ["k_bf16_d64", "k_f16_d128", "k_fp16", "plain"]
    assert [(p.name, p.ctype, p.pointer) for p in sigs["k_f16_d128"]] == [
        ("x", "__half", True), ("n", "long long", False), ("s", "float", False)]
    assert sigs["k_bf16_d64"][0].ctype == "__nv_bfloat16"
    assert [(p.name, p.ctype) for p in sigs["k_fp16"]] == [("y", "__half"), ("c", "int")]
    assert [(p.name, p.ctype) for p in sigs["plain"]] == [("a", "int"), ("b", "int")]


def test_parse_signatures_rejects_bad_tables():
    define = '#define K(NAME, T) extern "C" __global__ void NAME(T* x) { }\n'
    with pytest.raises(ValueError, match="defined twice"):
        _parse_signatures(define + "K(k_a, float)\nK(k_a, float)\n")
    with pytest.raises(ValueError, match="takes 2 arguments"):
        _parse_signatures(define + "K(k_a)\n")


@pytest.mark.parametrize("name", CU_FILES)
def test_signatures_are_literal(name):
    """After expansion, every entry point has a C identifier for a name and only parameters that
    check_args can check: pointers, or scalars of a known C type (no macro parameter left over)."""
    sigs = signatures(name)
    assert sigs, f"{name} exports no kernels"
    for kernel, params in sigs.items():
        assert re.fullmatch(r"[A-Za-z_]\w*", kernel), kernel
        for p in params:
            assert re.fullmatch(r"[A-Za-z_]\w*", p.name), (kernel, p)
            assert p.pointer or p.ctype in _SCALAR_TYPES or p.ctype == TENSOR_MAP, \
                f"{kernel}: parameter {p.name} has C type {p.ctype!r}"


def _python_bound_names() -> set[str]:
    """Names that the Python sources of mobalab.kernels bind (functions, classes, imports, assignments)."""
    names: set[str] = set()
    for path in PY_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name.split(".")[-1])
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return names


def wrapper_name_templates() -> dict[str, re.Pattern]:
    """Kernel names as the Python wrappers write them: every string literal or f-string in mobalab.kernels
    that reads as an identifier starting ``moba_`` (f-string fields stand for one word without ``_``), less
    the names of Python objects (``"moba_topk"`` in an error message is the Python function)."""
    bound = _python_bound_names()
    # torch custom ops ("mobalab::moba_attention_fwd") are looked up by name too; they are no kernels; nor is the
    # C type of a tensor-map parameter
    bound |= {m.group(1) for path in PY_SOURCES for m in re.finditer(r'"mobalab::(\w+)"', path.read_text())}
    bound.add(TENSOR_MAP)
    out = {}
    for path in PY_SOURCES:
        nodes = list(ast.walk(ast.parse(path.read_text())))
        in_fstring = {id(v) for n in nodes if isinstance(n, ast.JoinedStr) for v in n.values}
        for node in nodes:
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in in_fstring:
                if re.fullmatch(r"moba_\w+", node.value) and node.value not in bound:
                    out[node.value] = re.compile(re.escape(node.value))
            elif isinstance(node, ast.JoinedStr) and node.values:
                parts = []
                for v in node.values:
                    if isinstance(v, ast.Constant):
                        parts.append(v.value if re.fullmatch(r"\w*", v.value) else None)
                    else:
                        parts.append(None if v.format_spec else "{}")
                if None in parts or not "".join(parts).startswith("moba_"):
                    continue
                template = "".join(parts)
                out[template] = re.compile("".join("([A-Za-z0-9]+)" if p == "{}" else re.escape(p) for p in parts))
    return out


def test_wrapper_kernel_names_have_signatures():
    """Each kernel name the wrappers build matches an exported kernel, and where the name has fields, the
    kernels it matches are every combination of the field values (no missing instantiation); and every
    exported kernel is launched by some wrapper."""
    exported = {k for f in CU_FILES for k in signatures(f)}
    templates = wrapper_name_templates()
    assert len(templates) >= 10, f"found too few kernel names in the Python sources: {sorted(templates)}"
    covered = set()
    for template, pattern in templates.items():
        matches = {k: m.groups() for k in exported if (m := pattern.fullmatch(k))}
        assert matches, f"the wrappers launch {template!r}, which no cuda/*.cu file exports"
        fields = list(zip(*matches.values(), strict=True))
        want = set(itertools.product(*(sorted(set(f)) for f in fields)))
        missing = sorted("/".join(v) for v in want - set(matches.values()))
        assert not missing, f"{template!r}: no kernel for the field values {missing}"
        covered |= set(matches)
    assert exported - covered == set(), f"kernels that no wrapper launches: {sorted(exported - covered)}"


# ---- head dims ----

def head_dim(kernel: str) -> int | None:
    """The head dim of a kernel name (``..._d<D>`` or ``..._d<D>_...``), None for head-dim-free kernels."""
    m = _HEAD_DIM.search(kernel)
    return int(m.group(1)) if m else None


def kernel_head_dims() -> set[int]:
    """Head dims the CUDA sources are instantiated for."""
    return {d for f in CU_FILES for k in signatures(f) if (d := head_dim(k)) is not None}


def test_every_kernel_family_has_every_head_dim():
    """Kernels whose names carry a head dim come in families (the name with ``_d<D>`` as a field); each family
    is instantiated for every head dim of the sources, so no wrapper can reach a missing (family, D)."""
    dims = kernel_head_dims()
    assert dims == {32, 64, 96, 128, 256}
    families: dict[str, set[int]] = {}
    # decode (both kernels) serves head dims 64 and 128 only (_decode.py checks that at the door), the wgmma
    # forward head dim 128 only (resolve_variant refuses the others), the wgmma router 64 and 128
    # (resolve_router_variant), the "block" backward 64 and 128, the wgmma backward 128 (resolve_bwd_variant)
    partial = ("decode.cu", "decode_split.cu", _cuda_attention.WGMMA_SOURCE, _cuda_routing.WGMMA_SOURCE,
               _cuda_backward.WGMMA_SOURCE)
    partial_families = {f"moba_bwd_blk_{tag}_d{{}}": set(_cuda_backward.BLOCK_HEAD_DIMS) for tag in ("bf16", "f16")}
    for f in [f for f in CU_FILES if f not in partial]:
        for k in signatures(f):
            if (d := head_dim(k)) is not None:
                families.setdefault(_HEAD_DIM.sub("_d{}", k, count=1), set()).add(d)
    incomplete = {fam: sorted(partial_families.get(fam, dims) - got) for fam, got in families.items()
                  if got != partial_families.get(fam, dims)}
    assert not incomplete, f"kernel families missing head dims: {incomplete}"
    assert all(families[fam] == want for fam, want in partial_families.items())


def test_the_contract_supports_exactly_the_compiled_head_dims():
    """Every head dim the CUDA path accepts has kernels, and every compiled head dim is served."""
    from mobalab.kernels import _contract

    assert set(_contract.CUDA_HEAD_DIMS) == kernel_head_dims()


@pytest.mark.nvcc
# decode.cu and decode_split.cu serve head dims 64 and 128 in one module and have no filter
@pytest.mark.parametrize("name", [f for f in CU_FILES if f not in ("decode.cu", "decode_split.cu")])
def test_head_dim_filter_keeps_one_head_dim(name):
    """The source preprocessed with -DMOBA_HEAD_DIM=d exports exactly the head-dim-d and head-dim-free
    kernels, with the same signatures (system headers left out: the filter is plain preprocessor logic)."""
    nvcc = shutil.which("nvcc")
    text = re.sub(r"^[ \t]*#[ \t]*include[ \t]*<[^>\n]*>[ \t]*$", "", source(name), flags=re.M)
    every = signatures(name)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / name
        src.write_text(text)
        for d in sorted(kernel_head_dims()):
            proc = subprocess.run([nvcc, "-E", "-x", "c++", f"-DMOBA_HEAD_DIM={d}", str(src)],
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
            kept = _parse_signatures(proc.stdout)
            assert set(kept) == {k for k in every if head_dim(k) in (None, d)}, (name, d)
            assert all(kept[k] == every[k] for k in kept), (name, d)
