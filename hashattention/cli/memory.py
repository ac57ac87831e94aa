"""`hashattention memory`: KV-cache and signature bytes for a model, context and batch, before running."""
from __future__ import annotations

import json


def add_parser(sub):
    p = sub.add_parser("memory", help="KV cache vs signature memory for a model, context and batch")
    p.add_argument("model", nargs="?", default="default",
                   help="'default', a preset (llama-3.1-8b, llama-3.2-1b, llama-2-7b, mistral-7b, smollm2-135m), "
                        "a local model folder or a config.json; a comma list for several")
    p.add_argument("--context", default="128K", help="tokens per sequence (e.g. 32768, 32K, 128K); a comma list for "
                                                     "several")
    p.add_argument("--batch", default="1", help="sequences")
    p.add_argument("--dtype", default="bfloat16", help="KV cache dtype (bfloat16, float16, float32, fp8)")
    p.add_argument("--bits", type=int, default=32, help="signature bits per token per head")
    p.add_argument("--key-heads", choices=["kv", "q"], default="kv",
                   help="signature heads: one per KV head (default maps) or per query head (authors' layout)")
    p.add_argument("--gpu-memory", default="", help="GPU size (e.g. 80GiB) to say how many sequences fit "
                   "(default: this machine's GPU, if it has one)")
    p.add_argument("--host-memory", default="", help="host memory (e.g. 128GiB) to say whether HashAttention with "
                   "the K/V offloaded to host memory fits (default: what this machine has available)")
    p.add_argument("--heavy", default="1/32", help="heavy budget for the offload's GPU row cache (fraction or count)")
    p.add_argument("--sink", type=int, default=128)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--row-cache", type=float, default=2.0, help="GPU heavy-row cache, in multiples of the heavy "
                   "budget")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--out", default=None, help="also write every report, with the command, to this JSON file")
    p.set_defaults(func=run)


def _items(text: str) -> list[str]:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise ValueError(f"nothing to report in {text!r}")
    return items


def _machine_gpu():
    """Total memory of this machine's GPU 0, or None without CUDA."""
    import torch
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory


def run(args) -> int:
    from ..core.budget import parse_heavy
    from ..engine.memory import format_report, memory_report, parse_bytes
    from ..engine.offload import host_available_bytes
    gpu = parse_bytes(args.gpu_memory) if args.gpu_memory else _machine_gpu()
    host = parse_bytes(args.host_memory) if args.host_memory else (host_available_bytes() if gpu else None)
    reps = [memory_report(m, c, args.batch, dtype=args.dtype, bits=args.bits, key_heads=args.key_heads,
                          gpu_memory=gpu, host_memory=host, heavy=parse_heavy(args.heavy), sink=args.sink,
                          window=args.window, row_cache=args.row_cache)
            for m in _items(args.model) for c in _items(args.context)]
    if args.json:
        print(json.dumps(reps[0] if len(reps) == 1 else reps, indent=1))
    else:
        print("\n\n".join(format_report(r) for r in reps))
    if args.out:
        cmd = ["hashattention memory", ",".join(_items(args.model)), "--context", args.context, "--batch",
               str(args.batch), "--dtype", args.dtype, "--bits", str(args.bits), "--key-heads", args.key_heads]
        if gpu:
            cmd += ["--gpu-memory", f"{gpu / 2 ** 30:.2f}GiB"]
        if host:
            cmd += ["--host-memory", f"{host / 2 ** 30:.2f}GiB", "--heavy", args.heavy, "--sink", str(args.sink),
                    "--window", str(args.window), "--row-cache", str(args.row_cache)]
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(cmd), "computed": "from the model shapes (no device needed)",
                       "reports": reps}, f, indent=1)
    return 0
