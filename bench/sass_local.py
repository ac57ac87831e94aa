"""Compile the selection kernels for sm_90 on a machine without a GPU and report what ptxas made of them:
registers, shared memory, instruction counts (whole kernel and the count pass's tile loop), ballots (VOTE) and
shared-memory atomics (ATOMS). Static analysis only: it says how much work a change removes, not how fast it
runs (that needs bench/kernel_ab.py on the GPU).

    python3 bench/sass_local.py                 # the installed Triton
    PYTHONPATH=/path/to/other/triton python3 bench/sass_local.py   # another Triton (same Python ABI)

Session 7 (Triton 3.6 is the GPU machine's, 3.9 this machine's): count tile loop 623 instructions under 3.6 (57
VOTE: the ballot histogram), 340 under 3.9 (8 ATOMS: shared-memory atomics). The score + 1 / 0 encoding (commit
ef2292b) took emit from 2128 to 1744 instructions under 3.6 (measured: 14.3 -> 11.8 us at 512K) and the count
loop from 593 to 623 (measured: 20.5 -> 21.6 us).
Session 10 (Triton 3.9): the count loop went from 345 to 240 instructions (prefetch, 32-bit masks, bins known
in range, no 16-bit narrowing; measured 11.5 -> 10.2 us at 512K); since then the loop holds two paths (interior
tiles without masks, edge tiles with them): "tile loop" counts both, 270, of which ~190 run on an interior tile
(read from the SASS). A static count can mislead: a 256-bin histogram cut 21 loop instructions but added per-block
work outside the loop and was slower (kernel_ab_h200_s10d_t39.md).
Session 12 (Triton 3.9): kernel 2's split loop gives its K/V tiles one buffer each and waits for every copy at the
top of a step at 2-4 pipeline stages; from 5 on, two buffers and the next step's copies stay in flight
(split_buffers below; attention_notes_h100.md, session 12).
Session 11 (Triton 3.9): emit 1760 -> 2040 instructions in all (static: two tile paths, each block runs one) but
~28 -> ~11 per token on its common path and 96 (capped) -> 72 registers: kept flags as 0/1 from a sign bit, one
prefix sum, the scatter as inline predicated stores (no shared-memory layout change before tl.store); the one
block per row that splits its ties keeps the two-count path. Measured: emit 10.6 -> 7.2 us at 512K.
"""
import os
import re
import subprocess
import sys

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hashattention.kernels import score_select  # noqa: E402,F401
ss = sys.modules["hashattention.kernels.score_select"]

# the 512K, batch 1, shared-selection launch (Llama-3.1-8B shapes): 8 rows, blocks of 4096, exact 128-bin path
COMMON = dict(HSEL=8, BLOCK=4096, TILE=1024, NB=128, NCB=256, NFB=1, SHIFT=0, MAXS=128, FRAC=True, EXACT=True,
              PDL=False)
COUNT_TYPES = dict(QS="*i32", KS="*i32", SC="*u8", CSUF="*i32", CHIST="*i32", EPOCH="*i32", START="*i32",
                   END="*i32", FR="*fp64")
EMIT_TYPES = dict(SC="*u8", CSUF="*i32", CHIST="*i32", FSUF="*i32", FHIST="*i32", EPOCH="*i32", IDX="*i32",
                  COUNTS="*i32", START="*i32", END="*i32", FR="*fp64")
KERNELS = {
    "count": (ss._count_kernel, dict(COMMON, G=4, GS=4, KEY_PER_Q=False, W=1, HW=True, sk_n=1, PREFETCH=0,
                                     LOG2NB=7), COUNT_TYPES),
    "count_prefetch": (ss._count_kernel, dict(COMMON, G=4, GS=4, KEY_PER_Q=False, W=1, HW=True, sk_n=1,
                                              PREFETCH=1, LOG2NB=7), COUNT_TYPES),
    "emit": (ss._emit_kernel, dict(COMMON, NBLKP=128, ETILE=ss.CONFIG["emit_tile"], HW=True), EMIT_TYPES),
}
# integer arguments the GPU launch sees as multiples of 16 (Triton specializes them: vector loads and stores)
DIV16 = ("N", "NBLK", "HEAVY", "SINK", "WINDOW", "KTOT", "sk_b", "sk_h", "sq_b", "sq_h")


def compile_one(fn, consts, types, maxnreg=None, warps=4, stages=3, div16=DIV16):
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
             if t.startswith("*") or n in div16}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    opts = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def main():
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    print(f"triton {triton.__version__}")
    for name, (fn, consts, types) in KERNELS.items():
        emit = name == "emit"
        k = compile_one(fn, consts, types, ss.CONFIG["emit_maxnreg"] if emit else None,
                        ss.CONFIG["emit_warps" if emit else "num_warps"])
        path = f"/tmp/sass_local_{name}.cubin"
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", path], capture_output=True, text=True)
        regs = re.search(r"REG:(\d+)", res.stdout)
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", path], capture_output=True,
                              text=True).stdout
        ins = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
        line = (f"{name}: {regs.group(1) if regs else '?'} registers, {k.metadata.shared} B shared, {len(ins)} "
                f"instructions, VOTE {sum(op.startswith('VOTE') for _, _, op in ins)}, "
                f"ATOMS {sum(op.startswith('ATOMS') for _, _, op in ins)}")
        # the count pass's tile loop: from the backward branch's target to the branch
        back = [(int(a, 16), re.search(r"BRA\s+0x([0-9a-f]+)", sass[sass.find(f"/*{a}*/"):][:120]))
                for a, _, op in ins if op == "BRA"]
        loops = [(int(m.group(1), 16), at) for at, m in back if m and int(m.group(1), 16) < at]
        if name.startswith("count") and loops:
            lo, hi = max(loops, key=lambda x: x[1] - x[0])
            line += f"; tile loop {(hi - lo) // 16 + 1} instructions"
        print(line)
    split_buffers()


def split_buffers():
    """Kernel 2's split loop (Llama-8B group: 4 query heads, head_dim 128, bf16) at 2..5 pipeline stages: how many
    shared-memory buffers its K/V tiles get and how many copy groups the top of a step leaves in flight (0: it
    waits for this step's and the next one's rows alike)."""
    sd = sys.modules["hashattention.kernels.sparse_decode"]
    types = dict(Q="*bf16", K="*bf16", V="*bf16", IDX="*i32", CNT="*i32", OP="*fp32", MLP="*fp32", qk_scale="fp32")
    for bn in (64, 32):
        for stages in (2, 3, 4, 5):
            consts = dict(HSEL=8, G=4, GQ=4, GP=16, D=128, BLOCK_N=bn, DENSE=False, DOT_F32=False, PDL=False,
                          TRIGGER=False)
            # the 512K launch's integer arguments that are multiples of 16 (its cache and list strides among them:
            # without that the K/V rows are not known to be 16-byte aligned and are not copied through shared memory)
            div16 = ("sq_b", "sq_h", "sk_b", "sk_h", "sk_n", "sv_b", "sv_h", "sv_n", "si_b", "si_h", "SPLIT", "KMAX",
                     "NK")
            k = compile_one(sd._split_kernel, consts, types, warps=sd.CONFIG["num_warps"], stages=stages, div16=div16)
            ttgir = k.asm["ttgir"]
            bufs = re.findall(rf"local_alloc : \(\) -> !ttg.memdesc<(\d+)x{bn}x128xbf16", ttgir)
            waits = re.findall(r"async_wait %[^{]*\{num = (\d+)", ttgir)
            print(f"split: {bn}-row steps, {stages} stages: K/V buffers {bufs}, in-loop wait leaves "
                  f"{waits[-1] if waits else '?'} copy groups in flight, {k.metadata.shared} B shared")


if __name__ == "__main__":
    from hashattention.kernels import sparse_decode  # noqa: E402,F401
    main()
