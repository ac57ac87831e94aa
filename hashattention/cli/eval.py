"""`hashattention eval`: the RULER-style long-context suite + perplexity, every policy at equal budgets."""
from __future__ import annotations

from pathlib import Path


DEFAULT_LENGTHS, DEFAULT_BUDGETS = "2K,4K,8K", "1/4,1/8,1/16,1/32"
REPORT_DEFAULT_OUT = "runs/eval_default.json"  # git-ignored (committed results: bench/results)


def add_parser(sub):
    p = sub.add_parser("eval", help="long-context suite (RULER-style) and perplexity, policies side by side")
    p.add_argument("--model", default="default", help="'default', a local folder, a .gguf file or a hub id")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="context lengths, e.g. 2K,4K,8K")
    p.add_argument("--tasks", default="all", help="comma list of tasks or 'all'")
    p.add_argument("--policies", default="all", help="comma list: dense,oracle,hash,simhash,sink_window,quest,h2o,random")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help="heavy budgets (fractions of the context)")
    p.add_argument("--modes", default="everywhere", help="everywhere, decode and/or context (comma list): context = "
                   "dense context prefill, sparse question and answer (the authors' sparse-attention-hub protocol)")
    p.add_argument("--decode-budgets", default="1/16,1/32")
    p.add_argument("--decode-rounds", type=int, default=1)
    p.add_argument("--samples", type=int, default=4, help="prompts per task and length")
    p.add_argument("--round-size", type=int, default=2, help="samples per task in one batch round")
    p.add_argument("--limit", type=int, default=None, help="cap --samples (quick runs)")
    p.add_argument("--ppl-samples", type=int, default=2)
    p.add_argument("--ppl-from", type=int, default=1024)
    p.add_argument("--sink", type=int, default=128)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--maps", default=None, help="maps file for policy 'hash' (default: the shipped maps)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=REPORT_DEFAULT_OUT, help="results JSON (+ .md, .png beside it)")
    p.add_argument("--time-limit", type=float, default=None, help="stop starting new batches after this many seconds")
    p.add_argument("--reference-path", action="store_true", help="use the fp32 reference attention/selection")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--per-head", action="store_true", help="one selection per query head (default: per KV group)")
    p.add_argument("--selection", default=None, choices=["sum", "max", "union", "head"],
                   help="how a KV group's query heads share one selection for hash/simhash (default the library's); "
                        "the policies hash-sum, hash-max, hash-union, hash-head name one each")
    p.add_argument("--pass", dest="passes", action="append", default=None, metavar="SPEC",
                   help="run several suite passes under one --deadline instead (one model load), e.g. "
                        "'mode=context;policies=dense,hash-max;budgets=1/32;samples=12[;maps=FILE;tag=NAME]', then "
                        "write WORK/quality_summary.{json,md,png} (paired intervals against dense)")
    p.add_argument("--work", default="runs/quality", help="folder of the --pass results")
    p.add_argument("--summarize", nargs="+", default=None, metavar="FILE[@MAPS[@SKIP+SKIP]]",
                   help="only write the paired quality summary (--out's .json/.md/.png) of these results files: "
                        "the label of each file's hash maps, policies to leave out")
    p.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"),
                   help="paired differences A - B of two results files (FILE or BUNDLE#TAG) on the prompts both "
                        "answered, per mode, policy and budget, with 95%% intervals (e.g. two maps files)")
    p.add_argument("--bundle", default=None, metavar="OUT.json",
                   help="with --summarize FILE@TAG ...: write the files as one bundle file instead (read back by "
                        "--summarize, each member labelled by its tag)")
    p.add_argument("--deadline", type=float, default=600, help="seconds for all --pass passes")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="only render the table and plot of a results file (with --policies/--budgets/--lengths "
                        "as filters, 'all' for none) into --out's .md/.png")
    p.set_defaults(func=run)


def load_model(name, device=None):
    from ..models import load_model as _load
    return _load(name, device=device)


def run(args) -> int:
    from ..evaluation import ruler
    from ..evaluation.runner import Suite, budget_from_label, check_policies
    from ..policies import POLICIES
    if args.report:
        from ..evaluation.runner import render
        pick = lambda x: None if x in ("all", None) else [v.strip() for v in x.split(",") if v.strip()]  # noqa: E731
        out = None if args.out == REPORT_DEFAULT_OUT else args.out
        print(render(args.report, out, pick(args.policies), pick(args.budgets) if args.budgets != DEFAULT_BUDGETS
                     else None, pick(args.lengths) if args.lengths != DEFAULT_LENGTHS else None))
        return 0
    if args.compare:
        from ..evaluation.quality import compare_runs, load_results
        rows = compare_runs(load_results(args.compare[0]), load_results(args.compare[1]))
        if not rows:
            raise ValueError(f"{args.compare[0]} and {args.compare[1]} share no answered prompt of a sparse policy")
        print(f"A = {args.compare[0]}, B = {args.compare[1]}\n\n| mode | policy | budget | A - B [95% CI] | items |\n"
              "|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['mode']} | {r['policy']} | {r['budget']} | {r['delta']:+.1f} [{r['ci95'][0]:+.1f}, "
                  f"{r['ci95'][1]:+.1f}] | {r['n_items']} |")
        return 0
    if args.summarize:
        from ..evaluation.quality import bundle_files, parse_summary_spec, summarize_files
        specs = [parse_summary_spec(x) for x in args.summarize]
        if args.bundle:
            print(bundle_files([s[0] for s in specs], [s[1] for s in specs], args.bundle))
            return 0
        out = Path(args.out if args.out != REPORT_DEFAULT_OUT else "bench/results/quality_summary.json")
        path = summarize_files([s[0] for s in specs], out, [s[1] for s in specs], [s[2] for s in specs])
        print(path.with_suffix(".md").read_text())
        return 0
    if args.passes:
        from ..evaluation.passes import parse_pass, run_passes
        passes = [parse_pass(p) for p in args.passes]  # bad specs fail before the model loads
        for p in passes:
            check_policies(p.get("policies", "dense"), POLICIES)
            ruler.check_tasks(p.get("tasks", "all"))
        model, tok, _ = load_model(args.model, args.device)
        shipped, name = None, "shipped"
        if args.maps or any(q.get("maps", "shipped") == "shipped" and "hash" in q.get("policies", "hash")
                            for q in passes):
            from ..shipped import DEFAULT_MAPS
            from ..weights import load_maps
            path = args.maps or DEFAULT_MAPS
            shipped, name = load_maps(path, model.config, device=next(model.parameters()).device), Path(path).name
        run_passes(model, tok, passes, args.work, args.deadline, args.lengths, shipped, name)
        return 0
    ruler.check_tasks(args.tasks)  # bad names fail before the model loads
    check_policies(args.policies, POLICIES)
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    for b in budgets:
        budget_from_label(b)  # '1/32', '1/64+r1/64', 'p0.9/1/16': bad labels fail before the model loads
    model, tok, _ = load_model(args.model, args.device)
    maps, maps_path = None, None
    if "hash" in check_policies(args.policies, POLICIES):
        from ..shipped import DEFAULT_MAPS, has_default_maps
        from ..weights import load_maps
        if args.maps:
            maps_path = args.maps
        elif has_default_maps():
            maps_path = DEFAULT_MAPS
        if maps_path:
            maps = load_maps(maps_path, model.config, device=next(model.parameters()).device)
    samples = min(args.samples, args.limit) if args.limit else args.samples
    suite = Suite(model, tok, tasks=args.tasks, lengths=args.lengths, policies=args.policies, budgets=budgets,
                  samples=samples, round_size=args.round_size, modes=args.modes.split(","),
                  decode_budgets=args.decode_budgets.split(","), decode_rounds=args.decode_rounds, seed=args.seed,
                  sink=args.sink, window=args.window, chunk=args.chunk, maps=maps, maps_path=maps_path,
                  ppl_samples=args.ppl_samples, ppl_from=args.ppl_from, out=args.out,
                  time_limit=args.time_limit, progress=not args.no_progress, accelerate=not args.reference_path,
                  per_group=not args.per_head, selection="head" if args.per_head else args.selection)
    suite.run()
    print(open(suite.out.with_suffix(".md")).read() if suite.out else "")
    return 0
