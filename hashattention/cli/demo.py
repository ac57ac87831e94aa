"""`hashattention demo`: passkey retrieval on the default model, every policy at the same token budget."""
from __future__ import annotations

import json
import time

from ..core.budget import Budget

DEFAULT_POLICIES = ["dense", "oracle", "hash", "simhash", "sink_window", "random"]


def add_parser(sub):
    p = sub.add_parser("demo", help="passkey retrieval at 1K-8K tokens, each policy at the same budget")
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M-Instruct), a folder or hub id")
    p.add_argument("--lengths", default="1024,2048,4096,8000", help="prompt lengths in tokens, comma-separated")
    p.add_argument("--samples", type=int, default=2, help="prompts per length (more = tighter numbers)")
    p.add_argument("--budget", default="1/16", help="heavy tokens: a fraction of the context (1/16) or a count")
    p.add_argument("--sink", type=int, default=128)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    p.add_argument("--mode", choices=["decode", "context", "everywhere"], default="decode",
                   help="decode: dense prefill, sparse decode; context: dense context, sparse question and answer "
                        "(the authors' sparse-attention-hub protocol); everywhere: prefill sparse too (slower)")
    p.add_argument("--maps", default=None, help="maps file for 'hash' (default: the shipped maps)")
    p.add_argument("--per-head", action="store_true", help="select per query head instead of per KV group")
    p.add_argument("--selection", default=None, choices=["sum", "max", "union", "head"],
                   help="how a KV group's query heads share one selection (hash, simhash; default the library's)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    p.set_defaults(func=run)


def build_policies(names, budget, model, maps_path=None, per_group=True, quiet=False, selection=None):
    from ..policies import make_policy
    from ..shipped import has_default_maps, load_default_maps
    from ..weights import load_maps
    policies = {}
    for name in names:
        maps = None
        if name == "hash" or name.startswith("hash-"):
            if maps_path:
                maps = load_maps(maps_path, model.config, device=next(model.parameters()).device)
            elif has_default_maps():
                maps = load_default_maps(model)
            else:
                if not quiet:
                    print("note: no trained maps shipped yet; 'hash' is left out (train with `hashattention train`)")
                continue
        policies[name] = make_policy(name, budget, maps=maps, model_config=model.config, per_group=per_group,
                                     **({"selection": selection} if name in ("hash", "simhash") else {}))
    return policies


def format_table(results, lengths, policies, model_config) -> str:
    from ..weights import model_shape
    shp = model_shape(model_config)
    kv_bytes = 2 * shp["num_kv_heads"] * shp["head_dim"] * 2 * shp["num_layers"]  # K and V, bf16
    head = ["policy"] + [f"{L} tok" for L in lengths] + ["read/step @max", "extra B/token", "s/answer"]
    rows = []
    for name, pol in policies.items():
        rs = {r.length: r for r in results if r.policy == name}
        last = rs[lengths[-1]]
        bits = pol.extra_bits_per_token(shp["num_kv_heads"], shp["num_q_heads"]) * shp["num_layers"]
        secs = sum(r.seconds for r in rs.values()) / max(sum(r.samples for r in rs.values()), 1)
        rows.append([name] + [f"{rs[L].correct}/{rs[L].samples}" for L in lengths]
                    + [f"{last.tokens_read:.0f} ({last.tokens_read / max(last.context, 1):.1%})",
                       f"{bits / 8:.0f} ({bits / 8 / kv_bytes:.1%} of KV)", f"{secs:.2f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def run(args) -> int:
    from tqdm.auto import tqdm

    from ..evaluation.passkey import run_passkey
    from ..models import load_model
    lengths = [int(x) for x in str(args.lengths).split(",") if x.strip()]
    if not lengths or min(lengths) < 64:
        raise ValueError(f"--lengths must be comma-separated token counts >= 64, got {args.lengths!r}")
    if args.samples < 1:
        raise ValueError("--samples must be >= 1")
    budget = Budget(heavy=args.budget, sink=args.sink, window=args.window)
    budget.check_fits(min(lengths))
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    t0 = time.time()
    model, tok, model_id = load_model(args.model, device=args.device)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max(lengths) + 16 > limit:
        raise ValueError(f"length {max(lengths)} (+ answer) is over the model's {limit}-token window")
    policies = build_policies(names, budget, model, args.maps, per_group=not args.per_head,
                              selection="head" if args.per_head else args.selection)
    dev = next(model.parameters()).device
    print(f"{model_id} on {dev} ({time.time() - t0:.0f} s to load); budget {budget.describe()}, mode {args.mode}, "
          f"{'per query head' if args.per_head else 'shared per KV group'}")
    with tqdm(total=len(lengths) * args.samples * len(policies), desc="passkey", unit="answer") as bar:
        results = run_passkey(model, tok, policies, lengths, args.samples, mode=args.mode, seed=args.seed,
                              progress=bar)
    print(format_table(results, lengths, policies, model.config))
    print("read/step: tokens each query head reads per decode step (share of the context); extra B/token: "
          "signature bytes per cached token, all layers.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model_id, "device": str(dev), "budget": budget.describe(), "mode": args.mode,
                       "samples": args.samples, "results": [dict(r.__dict__, accuracy=r.accuracy) for r in results]},
                      f, indent=2)
    return 0
