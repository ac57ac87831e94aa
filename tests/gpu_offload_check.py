"""K/V in host memory on a GPU (issue 25; not collected by pytest: run it on a CUDA machine, prints ALL OK).

    . bench/gpu_env.sh && python3 tests/gpu_offload_check.py        # the default model's GGUF: see bench/gpu_env.sh

Checks:
  1. tests/offload_triton_check.py compiled on the GPU: the gather kernel reading *pinned* host memory equals its
     reference, and the engine's Triton path with pinned K/V gives the on-GPU tokens (tiny model, bf16);
  2. the default model, bf16, CUDA graphs, a 1024-token prompt, 32 new tokens, hash at 1/32 (sink 64, window 64)
     and at a heavy count of 32: offload with every layer's K/V on the host, and tiered (half the layers), give
     exactly the on-GPU HashAttention tokens (the working set is read in the selection's order: same sums);
     dense with K/V on the host (the baseline) gives the dense tokens; the hit rate is reported;
  3. the benchmark at a small size (default model shape, 16K x 1, every mode) and its real-text case (8K), as a
     user runs it; the report files are written under $OUT (or runs/).
"""
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import hashattention as ha  # noqa: E402
from hashattention.core.budget import Budget  # noqa: E402
from hashattention.engine import Generator, Transformer  # noqa: E402

assert torch.cuda.is_available(), "this check needs CUDA"
failed = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        failed.append(name)


def agree(a, b):
    same = (a == b).all(0).tolist()
    return f"{same.index(False) if False in same else len(same)}/{len(same)} tokens agree"


env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
r = subprocess.run([sys.executable, os.path.join(HERE, "offload_triton_check.py")], env=env, capture_output=True,
                   text=True, cwd=ROOT)
check("kernels on pinned memory == references; tiny engine offload == on-GPU", r.returncode == 0 and
      "ALL OK" in r.stdout, (r.stdout + r.stderr)[-2000:] if r.returncode else "")

model, tok, model_id = ha.load_model(device="cuda", dtype=torch.bfloat16)
maps = ha.load_default_maps(model)
m = Transformer.from_hf(model)
text = ("HashAttention encodes keys and queries in Hamming space with learned maps, and each query reads only the "
        "tokens whose signatures match its own best. ") * 40
ids = tok(text, return_tensors="pt").input_ids[:, :1024].cuda()
n = 32
for bud in (Budget(heavy=1 / 32, sink=64, window=64), Budget(heavy=32, sink=64, window=64)):
    m.setup_caches(1, 1024 + n, maps=maps, budget=bud)
    ref = Generator(m).generate(ids, n, mode="hash")
    dense = Generator(m).generate(ids, n, mode="dense")
    for gl in (0, m.c.num_layers // 2):
        m.setup_caches(1, 1024 + n, maps=maps, budget=bud, offload="host", gpu_layers=gl)
        assert m.host_kv.k_host.is_pinned()
        got = Generator(m).generate(ids, n, mode="hash")
        st = m.offload_stats()
        check(f"default model, {bud.describe()}, {gl} GPU layers: offload == on-GPU hash tokens",
              torch.equal(got, ref), f"({agree(got, ref)}; hit rate {st['hit_rate']:.3f}, "
                                     f"{st['bytes_fetched'] / (n - 1) / 1e3:.1f} kB per step)")
    m.setup_caches(1, 1024 + n, offload="host", gpu_layers=0, dense_baseline=True)
    got = Generator(m).generate(ids, n, mode="dense")
    check("default model: dense with K/V on the host == dense tokens", torch.equal(got, dense), f"({agree(got, dense)})")
m.k_cache = m.v_cache = m.sig_cache = m.host_kv = None
del m, model
torch.cuda.empty_cache()

out = os.environ.get("OUT") or os.path.join(ROOT, "runs")
r = subprocess.run([sys.executable, "-m", "hashattention", "bench", "decode", "--offload", "host", "--models",
                    "smollm2-135m", "--contexts", "16K", "--batches", "1", "--heavy", "1/32,256", "--row-cache", "1,2",
                    "--gpu-layers", "0",
                    "--steps", "16", "--real-text", "8K", "--tag", "check", "--out", out], env=env,
                   capture_output=True, text=True, cwd=ROOT)
ok = r.returncode == 0
rows = []
if ok:
    name = [f for f in os.listdir(out) if f.startswith("offload_") and f.endswith("_check.json")]
    with open(os.path.join(out, name[0])) as f:
        rows = json.load(f)["rows"]
modes = {x["mode"] for x in rows if "tok_s" in x}
real = [x for x in rows if x.get("text") == "real"]
check("bench decode --offload host at 16K and real text", ok and modes == {"hash-offload", "dense-offload",
                                                                            "dense-gpu", "hash-gpu"} and len(real) == 4
      and all(x["tokens_equal_to_gpu_path"] == x["new_tokens"] for x in real),
      "\n" + "\n".join(f"  real text {x['heavy']}, row cache x{x['row_cache_factor']:g}: hit rate "
                       f"{x['hit_rate']:.3f}, {x['pcie_bytes_per_step'] / 1e3:.1f} kB/step, "
                       f"{x['tokens_equal_to_gpu_path']}/{x['new_tokens']} tokens as on the GPU" for x in real)
      if ok else r.stderr[-3000:])
print("ALL OK" if not failed else f"FAILED: {failed}")
sys.exit(1 if failed else 0)
