"""What a launch costs inside a CUDA graph (issue 5): chains of 1 and 4 near-empty kernels, launched plainly,
as cooperative launches, and as one cooperative launch whose programs meet at a grid barrier 1 or 3 times.
Same timer as the attention benchmark (do_bench, L2 flushed, CUDA-graph replay), microseconds. Measured to
decide whether selection's count and emit launches should become one cooperative launch with a grid barrier
between them (session 6: no, kernel_ab_h200_s6a/b: a cooperative launch costs ~1 us more than a plain one,
about what the second launch costs).

    python3 bench/launch_overhead.py --out bench/results --tag h200
"""
import argparse
import json
import os

import torch
import triton
import triton.language as tl

from hashattention.benchmarks.attention import _device_name, _timer


@triton.jit
def _grid_sync(BAR, pid, nprog):
    """All programs (co-resident: a cooperative launch) meet here. BAR: an int32 the programs together
    advance by 2^31 per meeting (program 0 adds 2^31 - (nprog - 1), the others 1): its top bit flips exactly
    when the last one arrives, and it never needs resetting."""
    tl.debug_barrier()
    if nprog > 1:
        old = tl.atomic_add(BAR, tl.where(pid == 0, 0x7FFFFFFF - (nprog - 2), 1), sem="release", scope="gpu")
        cur = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
        while (cur ^ old) >= 0:
            cur = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _touch(X, BAR, MEET: tl.constexpr):
    pid = tl.program_id(0)
    for _ in tl.static_range(MEET):
        _grid_sync(BAR, pid, tl.num_programs(0))
    tl.store(X + pid, pid)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    measure = _timer(args.rep, True)
    x = torch.zeros(8 * sms, dtype=torch.int32, device=dev)
    bar = torch.zeros(1, dtype=torch.int32, device=dev)
    rows = []
    for grid in (sms, 2 * sms, 4 * sms):
        for name, chain, coop, meet in (("plain x1", 1, False, 0), ("plain x4", 4, False, 0),
                                        ("cooperative x1", 1, True, 0), ("cooperative x4", 4, True, 0),
                                        ("cooperative, 1 grid barrier", 1, True, 1),
                                        ("cooperative, 3 grid barriers", 1, True, 3)):
            def fn():
                for _ in range(chain):
                    _touch[(grid,)](x, bar, MEET=meet, num_warps=4, launch_cooperative_grid=coop)
            t, _ = measure(fn)
            rows.append({"programs": grid, "case": name, "us": t * 1e3})
            print(f"{grid:5d} programs  {name:32s} {t * 1e3:6.2f} us", flush=True)
    res = {"device": _device_name(dev), "torch": torch.__version__, "triton": triton.__version__, "rows": rows,
           "timing": "median of triton do_bench over CUDA-graph replays, L2 flushed, microseconds"}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"launch_overhead_{args.tag or 'gpu'}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
