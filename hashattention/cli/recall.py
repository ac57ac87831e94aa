"""`hashattention recall`: per-layer recall of the oracle top-k by the hash top-k on held-out text."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("recall", help="attention-level evaluation of maps: oracle top-k recall per layer",
                       description="On held-out text, for each layer: recall of the oracle top-k by the hash top-k "
                                   "and relative error of the attention output, learned maps against untrained "
                                   "SimHash signatures with the same bits.")
    p.add_argument("--model", default="default")
    p.add_argument("--maps", default="default",
                   help="maps files, comma-separated ('default' = the shipped maps)")
    p.add_argument("--names", default=None, help="names for the maps in the table, comma-separated")
    p.add_argument("--data", default="pydoc:heldout", help="held-out text (pydoc:heldout, a file/folder, a dataset)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--sequences", type=int, default=2, help="held-out sequences to average over")
    p.add_argument("--queries", type=int, default=64, help="last positions of each sequence used as queries")
    p.add_argument("--budgets", default="1/8,1/16,1/32")
    p.add_argument("--sink", type=int, default=128)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--no-simhash", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    p.add_argument("--md", default=None, help="write the table to this Markdown file")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch

    from ..core.budget import parse_heavy
    from ..core.maps import HashMaps
    from ..models import load_model
    from ..shipped import DEFAULT_MAPS
    from ..training.capture import capture, check_capturable
    from ..training.corpus import load_documents, pack_sequences, text_sha
    from ..training.recall import evaluate_layers, merge_runs, table
    from ..weights import load_maps

    budgets = tuple(parse_heavy(b) for b in args.budgets.split(","))
    for b in budgets:
        if not isinstance(b, float):
            raise ValueError(f"recall budgets must be fractions like 1/16, got {b}")
    paths = [str(DEFAULT_MAPS) if m == "default" else m for m in args.maps.split(",") if m]
    names = args.names.split(",") if args.names else [Path(p).stem for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} maps files")
    if args.queries <= 0 or args.sequences <= 0:
        raise ValueError("--queries and --sequences must be positive")
    for p in paths:
        if not Path(p).with_suffix(".safetensors").is_file():
            raise FileNotFoundError(f"maps file {p} does not exist")
    model, tok, model_id = load_model(args.model, device=args.device)
    check_capturable(model, args.context)
    dev = next(model.parameters()).device
    maps = {n: load_maps(p, model.config, device=dev) for n, p in zip(names, paths)}
    if not args.no_simhash:  # the untrained baseline at the same bits as each learned maps
        from ..weights import maps_config_for
        for b in sorted({m.config.bits for m in maps.values()} or {32}):
            base = maps_config_for(model.config, bits=b)
            maps[f"simhash-{b}"] = HashMaps.simhash(base, seed=args.seed).to(dev)
    docs, desc = load_documents(args.data, "validation", args.text_field)
    seqs = pack_sequences(tok, docs, args.context, args.sequences, seed=args.seed)
    t0 = time.perf_counter()
    runs = []
    for i in range(seqs.shape[0]):
        cap = capture(model, seqs[i:i + 1])
        runs.append(evaluate_layers(maps, cap, budgets, args.queries, args.sink, args.window))
        del cap
    res = merge_runs(runs)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    md = (f"Oracle top-k recall (per KV group) and attention-output relative error, {model_id}, "
          f"{seqs.shape[0]} held-out sequences x {args.context} tokens of {desc}, last {args.queries} positions as "
          f"queries, sink {args.sink} + window {args.window} + heavy budget; device {dev_name}.\n\n" + table(res))
    print(md)
    if args.md:
        Path(args.md).write_text(md + "\n")
    if args.json:
        info = {"model": model_id, "data": desc, "data_sha": text_sha(docs), "context": args.context,
                "sequences": int(seqs.shape[0]), "queries": args.queries, "sink": args.sink, "window": args.window,
                "device": dev_name, "seconds": round(time.perf_counter() - t0, 1),
                "maps": {n: {"path": p, "extra": maps[n].config.extra} for n, p in zip(names, paths)},
                "results": res}
        Path(args.json).write_text(json.dumps(info, indent=1))
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0
