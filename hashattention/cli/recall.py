"""`hashattention recall`: per-layer recall of the oracle top-k by the hash top-k on held-out text."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from . import layer_list


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
    p.add_argument("--selections", default=None, metavar="LIST",
                   help="instead: compare group selections (sum,max,union,head,soft-sum,soft-head,qsoft-sum; "
                        "tanh-sum, a diagnostic: both sides tanh, what the training loss ranks by) on the "
                        "questions of the suite's prompts (the context mode's sparse queries): attention mass, heavy "
                        "mass, top-1 hits, output error, rows read; with --suite-length and --suite-samples")
    p.add_argument("--top-p", default=None, metavar="LIST",
                   help="with --selections: also the adaptive budget at these target masses (e.g. 0.5,0.8,0.9), for "
                        "every listed selection the maps' calibration covers (`hashattention calibrate`), and the "
                        "same rule on the true weights (oracle-p...)")
    p.add_argument("--min-share", default=None, metavar="LIST",
                   help="with --selections: also the min-share rule at these shares (e.g. 0.001,0.002): read the keys "
                        "whose estimated share of the candidates' mass is at least this")
    p.add_argument("--top-p-cap", default="1/16", help="the adaptive budget's hard cap (heavy tokens)")
    p.add_argument("--suite-length", type=int, default=4096, help="prompt length for --selections")
    p.add_argument("--layers", default="", metavar="I,I,...",
                   help="with --selections: only these layers (e.g. 7,20; default all)")
    p.add_argument("--suite-samples", type=int, default=1, help="prompts per task for --selections (indices 100+)")
    p.add_argument("--answers", default=None, metavar="TASKS",
                   help="instead of held-out text: suite prompts of these tasks (comma list, 'all'; --suite-length, "
                        "--suite-samples) with their true answer appended, the queries that produce the answer")
    p.add_argument("--layer-groups", type=int, default=3, help="columns of the table: layers in this many groups "
                   "(the number of layers: one column per layer)")
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

    if args.selections:
        return run_selections(args)
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
    if args.layer_groups <= 0:
        raise ValueError("--layer-groups must be positive")
    tasks = None
    if args.answers:
        from ..evaluation import ruler
        tasks = ruler.check_tasks(args.answers)  # an unknown task: said before the model loads
        if args.suite_samples <= 0:
            raise ValueError("--suite-samples must be positive")
    for p in paths:
        if not Path(p).with_suffix(".safetensors").is_file():
            raise FileNotFoundError(f"maps file {p} does not exist")
    model, tok, model_id = load_model(args.model, device=args.device)
    check_capturable(model, args.suite_length if tasks else args.context)
    dev = next(model.parameters()).device
    maps = {n: load_maps(p, model.config, device=dev) for n, p in zip(names, paths)}
    if not args.no_simhash:  # the untrained baseline at the same bits as each learned maps
        from ..weights import maps_config_for
        for b in sorted({m.config.bits for m in maps.values()} or {32}):
            base = maps_config_for(model.config, bits=b)
            maps[f"simhash-{b}"] = HashMaps.simhash(base, seed=args.seed).to(dev)
    t0 = time.perf_counter()
    runs = []
    if tasks:  # each prompt + its true answer, read once; the queries: the positions that produce the answer
        for s in _probe_prompts(tok, tasks, args):
            ans = tok(s.answers[0], add_special_tokens=False).input_ids
            cap = capture(model, torch.tensor([s.ids + ans], device=dev))
            runs.append(evaluate_layers(maps, cap, budgets, len(ans) + 1, args.sink, args.window))
            del cap
        docs, desc = [], f"suite prompts ({', '.join(tasks)}; indices 100+) with their answer appended"
        what = (f"{len(runs)} prompts x {args.suite_length} tokens, {desc}, the queries that produce the answer")
    else:
        docs, desc = load_documents(args.data, "validation", args.text_field)
        seqs = pack_sequences(tok, docs, args.context, args.sequences, seed=args.seed)
        for i in range(seqs.shape[0]):
            cap = capture(model, seqs[i:i + 1])
            runs.append(evaluate_layers(maps, cap, budgets, args.queries, args.sink, args.window))
            del cap
        what = (f"{seqs.shape[0]} held-out sequences x {args.context} tokens of {desc}, last {args.queries} "
                "positions as queries")
    res = merge_runs(runs)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    md = (f"Oracle top-k recall (per KV group) and attention-output relative error, {model_id}, {what}, "
          f"sink {args.sink} + window {args.window} + heavy budget; device {dev_name}.\n\n"
          + table(res, args.layer_groups))
    print(md)
    if args.md:
        Path(args.md).write_text(md + "\n")
    if args.json:
        info = {"model": model_id, "data": desc, "data_sha": text_sha(docs) if docs else None,
                "context": args.suite_length if tasks else args.context, "sequences": len(runs),
                "queries": "the answer's" if tasks else args.queries, "sink": args.sink, "window": args.window,
                "device": dev_name, "seconds": round(time.perf_counter() - t0, 1),
                "maps": {n: {"path": p, "extra": maps[n].config.extra} for n, p in zip(names, paths)},
                "results": res}
        Path(args.json).write_text(json.dumps(info, indent=1))
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


def _probe_prompts(tok, tasks: list, args):
    """Suite-style prompts for attention-level probes: ``--suite-samples`` per task at ``--suite-length``, at
    indices 100+ so that they are never the suite's own prompts."""
    from ..evaluation import ruler
    res = ruler.Resources()
    for i in range(args.suite_samples):
        for task in tasks:
            yield ruler.make_sample(tok, task, args.suite_length, 100 + i, args.seed, res)


SELECTION_NAMES = ("sum", "max", "union", "head", "soft-sum", "soft-head", "qsoft-sum", "tanh-sum")


def run_selections(args) -> int:
    """``recall --selections``: the group selections side by side on the suite's questions."""
    import torch
    from tqdm.auto import tqdm

    from ..core.budget import Budget, parse_heavy
    from ..evaluation import ruler
    from ..models import load_model
    from ..shipped import DEFAULT_MAPS
    from ..training.capture import capture, check_capturable
    from ..training.recall import evaluate_selections
    from ..weights import load_maps

    sels = [x.strip() for x in args.selections.split(",") if x.strip()]
    bad = [x for x in sels if x not in SELECTION_NAMES]
    if bad or not sels:
        raise ValueError(f"unknown selection(s) {bad}; available: {', '.join(SELECTION_NAMES)}")
    budgets = tuple(parse_heavy(b) for b in args.budgets.split(","))
    if any(not isinstance(b, float) for b in budgets):
        raise ValueError("--budgets must be fractions like 1/32")
    if args.suite_samples <= 0:
        raise ValueError("--suite-samples must be positive")
    def floats(text, what):
        try:
            return [float(x) for x in (text or "").split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"{what} takes numbers like 0.9, got {text!r}") from None
    top_p, min_share = floats(args.top_p, "--top-p"), floats(args.min_share, "--min-share")
    cap_heavy = parse_heavy(args.top_p_cap)
    for x in top_p:  # bad targets or cap fail here, before the model loads
        Budget(heavy=cap_heavy, top_p=x)
    for x in min_share:
        Budget(heavy=cap_heavy, min_share=x)
    layers = list(layer_list(args.layers))
    if layers and (top_p or min_share):
        raise ValueError("--layers does not take the adaptive budget (--top-p/--min-share): its calibration "
                         "covers every layer")
    paths = [str(DEFAULT_MAPS) if p.strip() == "default" else p.strip() for p in args.maps.split(",")]
    names = args.names.split(",") if args.names else [Path(p).stem for p in paths]
    if len(names) != len(paths) or len(set(names)) != len(names):
        raise ValueError(f"{len(names)} names for {len(paths)} maps files (one distinct name each)")
    model, tok, model_id = load_model(args.model, device=args.device)
    check_capturable(model, args.suite_length)
    dev = next(model.parameters()).device
    all_maps = {}
    for name, path in zip(names, paths):
        maps = load_maps(path, model.config, device=dev)
        if layers:
            maps = maps.take_layers(layers)  # names a layer the maps lack
        if (top_p or min_share) and not any(s in maps.calibrations for s in sels):
            raise ValueError(f"the maps {path} have no calibration for {', '.join(sels)}: run `hashattention calibrate`")
        all_maps[name] = maps
    totals, n = {name: {} for name in names}, 0
    t0 = time.perf_counter()
    with tqdm(total=len(ruler.TASKS) * args.suite_samples, unit="prompt", desc="selections") as bar:
        for s in _probe_prompts(tok, list(ruler.TASKS), args):
            cap = capture(model, torch.tensor([s.ids], device=dev))  # one capture for every maps file
            if layers:
                cap = cap.take_layers(layers)
            for name, maps in all_maps.items():
                r = evaluate_selections(maps, cap, s.context_len, budgets, sels, args.sink, args.window,
                                        top_p=top_p, cap_heavy=cap_heavy, min_share=min_share)
                for k, v in r.items():
                    t = totals[name].setdefault(k, dict.fromkeys(v, 0.0))
                    for m in v:
                        t[m] += v[m]
            n += 1
            bar.update(1)
    by_maps = {name: {k: {m: x / n for m, x in v.items()} for k, v in t.items()} for name, t in totals.items()}
    path = paths[0]
    md = "\n".join(_selections_md(args, rows, n, model_id, paths[names.index(name)], layers, top_p, min_share, dev)
                   for name, rows in by_maps.items())
    print(md)
    if args.md:
        Path(args.md).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model_id, "maps": path, "length": args.suite_length,
                                               "prompts": n, "device": _device_name(dev), "sink": args.sink,
                                               **({"layers": layers} if layers else {}),
                                               "window": args.window, "seconds": round(time.perf_counter() - t0, 1),
                                               "command": "hashattention recall " + " ".join(sys.argv[2:]),
                                               "rows": by_maps[names[0]],
                                               **({"maps_files": dict(zip(names, paths)), "rows_by_maps": by_maps}
                                                  if len(names) > 1 else {})}, indent=1))
    return 0


def _device_name(dev) -> str:
    import torch
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def _selections_md(args, rows: dict, n: int, model_id: str, path: str, layers, top_p, min_share, dev) -> str:
    dev_name = _device_name(dev)
    lines = [f"Group selections on the questions of the suite's prompts ({n} prompts x {args.suite_length} tokens, "
             f"{model_id}, maps {Path(path).stem}, sink {args.sink} + window {args.window}; device {dev_name}). "
             "mass: attention weight on the tokens read, heavy: the same over the heavy candidates only (sink and "
             "window excluded), top-1: a query head's heaviest candidate read, error: relative error of the "
             "attention output, rows: rows read per KV head and query. Means over "
             + (f"layers {', '.join(map(str, layers))}" if layers else "layers") + ", heads and queries."
             + (f" NAME-pP: the adaptive budget, top-p P of the estimated candidate mass under a cap of "
                f"{args.top_p_cap}; NAME-sS: the keys whose estimated share of it is at least S, same cap "
                "(oracle-pP, oracle-sS: the same rules on the true weights)." if top_p or min_share else ""), "",
             "| selection | budget | mass | heavy | top-1 | error | rows |", "|---|---|---|---|---|---|---|"]
    for k in sorted(rows, key=lambda x: (x.split("@")[1] if "-p" not in x and "-s" not in x else "~", x.split("@")[0])):
        v = rows[k]
        name, b = k.split("@")
        lines.append(f"| {name} | {b} | {v['mass']:.3f} | {v['heavy_mass']:.3f} | {v['top1']:.3f} | "
                     f"{v['rel_error']:.3f} | {v['read']:.0f} |")
    return "\n".join(lines) + "\n"
