"""`hashattention generate` on a GPU (not collected by pytest: run it on a CUDA machine, prints ALL OK).

    . bench/gpu_env.sh && python3 tests/gpu_generate_check.py        # the default model's GGUF: see bench/gpu_env.sh

Checks, default model, bf16, a 1024-token prompt, 32 new tokens:
  1. the engine's path (CUDA graphs, Triton kernels) gives the Hugging Face path's tokens at full budget, for
     policies dense and hash;
  2. `--engine auto` takes the engine for hash at 1/32 (agreement with the HF path is reported: near-ties in bf16
     may flip a late token, so it is not required);
  3. sampling with a fixed seed (--temperature 0.8 --top-p 0.9 --seed 1) gives the same tokens twice, on both paths;
  4. the command itself, as a user runs it: `hashattention generate --prompt ... --max-new-tokens 32`.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hashattention as ha  # noqa: E402
from hashattention.cli import generate as gen_cli  # noqa: E402
from hashattention.cli import main as cli  # noqa: E402

assert torch.cuda.is_available(), "this check needs CUDA"
model, tok, model_id = ha.load_model()
gen_cli.load_tokenizer = lambda name: (tok, model.config)
gen_cli.load_model = lambda name, device: (model, model_id)
text = ("HashAttention encodes keys and queries in Hamming space with learned maps, and each query reads only the "
        "tokens whose signatures match its own best. ") * 40
prompt = tok.decode(tok(text).input_ids[:1024])
work = tempfile.mkdtemp()
failed = []


def gen(*argv):
    out = os.path.join(work, "g.json")
    rc = cli.main(["generate", "--prompt", prompt, "--max-new-tokens", "32", *argv, "--json", out])
    assert rc == 0, f"generate {argv} exited {rc}"
    with open(out) as f:
        return json.load(f)


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        failed.append(name)


def agree(a, b):
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{n}/{max(len(a), len(b))} tokens agree"


for policy in ("dense", "hash"):
    e, h = gen("--policy", policy, "--budget", "full", "--engine", "on"), gen("--policy", policy, "--budget", "full",
                                                                            "--engine", "off")
    check(f"{policy} full budget: engine == hf", e["tokens"] == h["tokens"] and e["path"] == "engine",
          f"({agree(e['tokens'], h['tokens'])}; engine {e['tokens_per_s']:.0f} tok/s, hf {h['tokens_per_s']:.0f})")
e, h = gen("--policy", "hash", "--budget", "1/32"), gen("--policy", "hash", "--budget", "1/32", "--engine", "off")
check("hash 1/32: auto takes the engine", e["path"] == "engine",
      f"(vs hf: {agree(e['tokens'], h['tokens'])}; read {e['tokens_read_per_step']:.0f} of "
      f"{e['context_per_step']:.0f} per step; {e['tokens_per_s']:.0f} tok/s, hf {h['tokens_per_s']:.0f})")
for engine in ("on", "off"):
    s = ["--temperature", "0.8", "--top-p", "0.9", "--seed", "1", "--engine", engine]
    a, b = gen(*s), gen(*s)
    check(f"sampling reproducible, engine {engine}", a["tokens"] == b["tokens"], f"({agree(a['tokens'], b['tokens'])})")
r = subprocess.run([sys.executable, "-m", "hashattention", "generate", "--prompt", "The capital of France is",
                    "--max-new-tokens", "32"], capture_output=True, text=True)
check("the command as a user runs it", r.returncode == 0 and "path: engine" in r.stderr and r.stdout.strip() != "",
      f"\n  stdout: {r.stdout.strip()[:200]!r}\n  stderr: {r.stderr.strip().splitlines()[-1] if r.stderr else ''}")
print("ALL OK" if not failed else f"FAILED: {failed}")
sys.exit(1 if failed else 0)
