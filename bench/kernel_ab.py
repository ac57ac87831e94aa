"""Side-by-side A/B of decode-kernel launch options on one GPU (issue 5), all on the same tensors in one
process, each variant's index lists checked against the PyTorch reference.

    python3 bench/kernel_ab.py --out bench/results --tag h200_s6c

Times: medians over CUDA-graph replays, L2 flushed before each (hashattention.benchmarks.attention._timer; since
session 11 by a read of 256 MB, before by do_bench's write of 256 MB, see bench/l2_flush.py).
Writes kernel_ab_<tag>.{json,md}. Runs, each with the list of its time: s6h emit tiles and warps (none faster
than the defaults). Earlier runs, each with the list of its time: s5c/d (script at commit 45f19be)
programmatic dependent launch, carry-save popcounts, the emit step fused into kernel 2; s5e-h the exact
histogram, emit tiles/warps/prefetch, index prefetch; s6a/b count and emit as one cooperative launch with a grid
barrier (its code was not kept: no faster, see attention_notes_h100.md and launch_overhead_h200_s6b.json);
s6c kernel 2 shapes; s6d/e (with --base, the previous commit's score_select.py) the histogram epoch and the
bin-major suffix tables; s6f/g kernel 2 programs per SM; s6i vector stores of the score bytes (no change, not
kept; the list is that run's). Session 7 (--kernels adds each kernel's device time, --chain L the time per call
in a chain of L calls): s7a count-step prefetch (branch exp/count-prefetch, with --base), s7b/c the plan written
by the last count block (branch exp/plan, with --base), s7d/e kernel 2 shapes and merge column slices, s7f the
kept short-list shape (the list above), s7g several emit blocks per program, s7h a one-count emit path for the
blocks that keep all or none of their ties (none of s7a-c, g, h kept: s7a-c live on their branches, s7g/h are
described in attention_notes_h100.md, session 7); s7i (with --base, the previous commit) one top-count reduction
per count block (kept), 16 count programs per SM and kernel 2's short shape up to 6 steps (within noise);
s7j (the list above, --base main=c61fc00's file) scores stored as score + 1 / 0 (kept), s7k the same with the
select only in the tiles that hold non-candidates (--base where=...: equal, not kept). Session 8:
s8_t36{,b} / s8_t39{,b} the defaults under Triton 3.6 and 3.9 (`bash bench/h200_kernels.sh t39`); s8a (the list
above, Triton 3.9) emit tiles and warps, and the count shape the bench's sweep preferred: none faster. Session 9
(the list above, --heavy 1/8 at 8x256K, 8x512K where FlashInfer's gather beat kernel 2, then the default cases
at 1/32): kernel 2 shapes, s9_long and s9_short; s9_t36{a,b} / s9_t39{a,b} the default at 1/8 of 256K and
512K x 8 under Triton 3.6 and 3.9 in turn. Session 10 (`bash bench/h200_kernels.sh pf`, Triton 3.9 then 3.6):
s10pf the count step prefetching the next tile's words (count_prefetch; with tiles of 512 and 2048 and 4
programs per SM: not kept), s10reg emit register caps 96 (kept), 80 and 64, and count_prefetch off; s10c, s10d
and s10e (the list above, with --base NAME=.ab/NAME.py, the file of the code before) the count step's
instruction cuts, the 256-bin histogram (s10d, dropped) and the unmasked interior tiles (s10e, kept).
Session 11 (`AB_ARGS="--base s10e=.ab/s10e.py" bash bench/h200_kernels.sh pf`): s11a the emit step's one-count
path with inline scatter stores beside s10e's emit (its tie split then a second pass over the block: slower at
128K), s11b the split block's ties in the same pass, emit tiles and warps (2048 x 4 kept); s11c (--base
s11b=...) the group's bit matches as a weighted popcount (kept) and count tiles of 2048; s11d (the list above,
--base s11c=...) histogram bins by an unsigned min and the count loop two tiles a trip (within 1%, not kept).
Session 12 (Triton 3.9, --kernels; s12b/c with --chain 8): s12a the count loop two tiles ahead, capped or not,
and an emit cap of 64 registers (none kept; that code was not kept either), s12b programmatic dependent launch on
all boundaries or the selection's only, and kernel-1 blocks for 4 programs per SM, s12c (the list above, Triton
3.9 and 3.6) PDL per boundary: count -> emit and split -> merge kept; s12d the launch shapes the bench's sweep
picked (kernel-1 tiles of 2048 x 8 warps for 4 programs per SM; kernel 2 with 3 stages, 8 programs per SM),
s12e small problems in blocks of 2048 (small_tile, kept) against none. Prepared, not yet run (the list above,
`AB_ARGS="--base s12pipe=.ab/s12pipe.py" bash bench/h200_kernels.sh pf`, carrying .ab): the count loop's
signature loads left in place and pipelined by `tl.range(..., num_stages=3 or 4)` through shared memory (see
attention_notes_h100.md, session 12, "Next"); kernel 2 with 5 pipeline stages, the first count at which Triton
double-buffers its K/V rows (same place). Session 13 (Triton 3.9, --kernels --chain 8): s13a (with --base
s12pipe=.ab/s12pipe.py) those two, and both together: none kept (count pipelined 128K 22.5 -> 22.9 us, 512K
44.6 -> 45.1; 5 stages 512K 44.6 -> 44.5 but 128K x 8 72.5 -> 80.3); s13b (Triton 3.9 and 3.6) the emit step
loading its block's second tile up front (80 registers; capped at 72): within 0.3 us everywhere, code and
variants gone; kernel 2 with 3 stages and 8 programs per SM again: 512K 44.4 -> 43.3 under 3.9 but 52.4 -> 57.2
and 128K x 8 89.0 -> 100.9 under 3.6 (the default stays). s13c (the list above, after Nsight showed the emit
step at 1.11 waves): emit tiles of 1024 with 2 or 4 warps (slower: 128K emit 3.9 -> 4.2-4.4 us) and emit capped
at 64 registers (one wave: 512K emit 7.3 -> 7.1 us, both kernels 44.5 / 44.8 -> 44.3 / 44.3, 16K 14.7 / 15.2 ->
15.5 / 15.6): none kept.
"""
import argparse
import importlib
import importlib.util
import json
import os

import torch

from hashattention import Budget
from hashattention.core.budget import parse_heavy
from hashattention.benchmarks.attention import _device_name, _timer, random_case, kernel_breakdown

# the modules (the package binds these names to functions)
ss = importlib.import_module("hashattention.kernels.score_select")
sd = importlib.import_module("hashattention.kernels.sparse_decode")

# name, score_select overrides, sparse_decode overrides[, NAME: score_select from --base NAME=PATH instead]
VARIANTS = [
    ("default", {}, {}),
    ("count_t4096_w8", {"tile": 4096, "num_warps": 8}, {}),
    ("count_t4096_w8_pf0", {"tile": 4096, "num_warps": 8, "count_prefetch": 0}, {}),
    ("count_t2048_w4", {"tile": 2048}, {}),
    ("default_again", {}, {}),
    ("count_t4096_w8_again", {"tile": 4096, "num_warps": 8}, {}),
    ("count_t4096_w8_pf0_again", {"tile": 4096, "num_warps": 8, "count_prefetch": 0}, {}),
    ("count_t2048_w4_again", {"tile": 2048}, {}),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1x16K,1x128K,1x512K,8x128K")
    ap.add_argument("--heavy", default="1/32", help="heavy budget of every case (fraction or count)")
    ap.add_argument("--variants", default="", help="comma list of VARIANTS names to run (default: all)")
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--kernels", action="store_true", help="also each kernel's device time (torch profiler)")
    ap.add_argument("--chain", type=int, default=0,
                    help="also time L calls in one CUDA graph on L copies of the caches (per call: as the layers "
                         "of a decode step run them, without one graph launch per call)")
    ap.add_argument("--base", action="append", default=[],
                    help="NAME=PATH: another score_select.py (e.g. an earlier commit's) for the variants named NAME")
    args = ap.parse_args()
    mods = {"": ss}
    for item in args.base:  # loaded as sibling modules, so their relative imports resolve
        name, path = item.split("=", 1)
        spec = importlib.util.spec_from_file_location(f"hashattention.kernels._ab_{name}", path)
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    dev = torch.device("cuda")
    measure = _timer(args.rep, True)
    hq, hkv, d = 32, 8, 128
    budget = Budget(heavy=parse_heavy(args.heavy), sink=128, window=128)
    rows = []
    base_cfg = {k: dict(m.CONFIG) for k, m in mods.items()}
    att_cfg0 = dict(sd.CONFIG)
    for case in args.cases.split(","):
        b, n, q, kc, vc, q_sig, k_sig, st, ln = random_case(case, dev, hq, hkv, d)
        sdpa, _ = measure(lambda: torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], kc, vc, enable_gqa=True))
        chain, sdpa_chain = [], None
        if args.chain:  # L copies (L2 holds none of them when its call comes)
            chain = [(kc.clone(), vc.clone(), k_sig.clone()) for _ in range(args.chain)]
            sdpa_chain, _ = measure(lambda: [torch.nn.functional.scaled_dot_product_attention(
                q[:, :, None], kc_, vc_, enable_gqa=True) for kc_, vc_, _ in chain])
        ref = sd.sparse_decode(q, kc, vc, *ss.score_select(q_sig, k_sig, st, ln, budget, hkv, True))
        ref_idx = ss.score_select_reference(q_sig, k_sig, st, ln, budget, hkv, True)[0]
        for name, sel_cfg, att_cfg, *which in VARIANTS:
            if args.variants and name not in args.variants.split(","):
                continue
            m = mods.get(which[0] if which else "")
            if m is None:
                continue
            bad = sorted(set(sel_cfg) - set(base_cfg[which[0] if which else ""]) | set(att_cfg) - set(att_cfg0))
            if bad:  # a key the kernels do not read would run the default under the variant's name
                raise SystemExit(f"variant {name}: unknown CONFIG keys {bad}")
            m.CONFIG.update(base_cfg[which[0] if which else ""], **sel_cfg)
            sd.CONFIG.update(att_cfg0, **att_cfg)
            try:
                t_sel, _ = measure(lambda: m.score_select(q_sig, k_sig, st, ln, budget, hkv, True))
                idx, cnt = m.score_select(q_sig, k_sig, st, ln, budget, hkv, True)
                t_att, _ = measure(lambda: sd.sparse_decode(q, kc, vc, idx, cnt, check=False))
                t_two, _ = measure(lambda: sd.sparse_decode(q, kc, vc, *m.score_select(q_sig, k_sig, st, ln, budget,
                                                                                       hkv, True), check=False))
                out = sd.sparse_decode(q, kc, vc, *m.score_select(q_sig, k_sig, st, ln, budget, hkv, True))
                err = float((out.float() - ref.float()).norm() / ref.float().norm())
                r = {"case": case, "variant": name, "sdpa_us": sdpa * 1e3, "select_us": t_sel * 1e3,
                     "attention_us": t_att * 1e3, "two_kernels_us": t_two * 1e3, "rel_diff_vs_default": err,
                     "idx_equals_reference": bool(torch.equal(idx, ref_idx))}
                if args.kernels:
                    r["kernels_us"] = {k.split("(")[0][:40]: round(v, 2) for k, v in kernel_breakdown(
                        lambda: sd.sparse_decode(q, kc, vc, *m.score_select(q_sig, k_sig, st, ln, budget, hkv,
                                                                            True), check=False),
                        lambda s: None).items()}
                    print(f"{case:8s} {name:26s} kernels {r['kernels_us']}", flush=True)
                if chain:
                    t_chain, _ = measure(lambda: [sd.sparse_decode(q, kc_, vc_, *m.score_select(
                        q_sig, ks_, st, ln, budget, hkv, True), check=False) for kc_, vc_, ks_ in chain])
                    r["chain_us"] = t_chain * 1e3 / len(chain)
                    r["sdpa_chain_us"] = sdpa_chain * 1e3 / len(chain)
                    print(f"{case:8s} {name:26s} per call in a chain of {len(chain)}: {r['chain_us']:.1f} us, "
                          f"SDPA {r['sdpa_chain_us']:.1f} (x{sdpa_chain / t_chain:.2f})", flush=True)
            except Exception as e:  # a launch option the machine refuses: say so, go on
                print(f"{case} {name}: failed {type(e).__name__}: {e}", flush=True)
                rows.append({"case": case, "variant": name, "failed": f"{type(e).__name__}: {e}"})
                continue
            rows.append(r)
            print(f"{case:8s} {name:26s} sel {r['select_us']:6.1f} att {r['attention_us']:6.1f} "
                  f"2k {r['two_kernels_us']:6.1f} | sdpa {r['sdpa_us']:7.1f} (x{sdpa / t_two:.2f}) diff {err:.1e} "
                  f"idx==ref {r['idx_equals_reference']}",
                  flush=True)
        del kc, vc, chain
        torch.cuda.empty_cache()
    for k, m in mods.items():
        m.CONFIG.update(base_cfg[k])
    sd.CONFIG.update(att_cfg0)
    res = {"device": _device_name(dev), "torch": torch.__version__, "budget": budget.describe(), "rows": rows,
           "timing": "median of triton do_bench over CUDA-graph replays, L2 flushed, microseconds"}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "kernel_ab" + (f"_{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Decode kernel A/B ({res['device']}, {budget.describe()}, Llama-3.1-8B shapes, bf16)", "",
             f"{res['timing']}. sel = score_select, att = sparse_decode, 2k = the two one after the other; "
             "x = SDPA / 2k.", "",
             "| case | variant | sel | att | 2k | SDPA | x |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['case']} | {r['variant']} | failed: {r['failed'][:80]} | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['variant']} | {r['select_us']:.1f} | {r['attention_us']:.1f} | "
                     f"{r['two_kernels_us']:.1f} | {r['sdpa_us']:.1f} | {r['sdpa_us'] / r['two_kernels_us']:.2f} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
