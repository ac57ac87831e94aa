"""`hashattention calibrate`: fit the adaptive budget's score-to-mass tables (core.calibration) for maps."""
from __future__ import annotations

import sys
import time
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("calibrate", help="fit the adaptive (top-p) budget's calibration of maps on held-out text",
                       description="Per layer and selection head, the mean share of the heavy candidates' attention "
                                   "mass held by a key of each bit-match score, measured on held-out text; written "
                                   "beside the maps as NAME.calibration.json (Budget(top_p=...) reads it).")
    p.add_argument("--model", default="default")
    p.add_argument("--maps", default="default", help="maps file ('default' = the shipped maps)")
    p.add_argument("--data", default="pydoc:heldout", help="held-out text (never the suite's prompts)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--queries", type=int, default=128, help="last positions of each sequence used as queries")
    p.add_argument("--selections", default="sum", help="comma-separated: sum, max, head")
    p.add_argument("--sink", type=int, default=128)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--min-count", type=int, default=16, help="keys a score value needs to be estimated")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=1, help="which held-out sequences (the recall uses seed 0)")
    p.add_argument("--out", default=None, help="calibration file (default: beside the maps)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..core.calibration import CAL_SELECTIONS
    from ..models import load_model
    from ..shipped import DEFAULT_MAPS
    from ..training.calibrate import Fitter
    from ..training.capture import capture, check_capturable
    from ..training.corpus import load_documents, pack_sequences, text_sha
    from ..weights import calibration_path, load_maps, save_calibrations

    sels = [s.strip() for s in args.selections.split(",") if s.strip()]
    bad = [s for s in sels if s not in CAL_SELECTIONS]
    if bad or not sels:
        raise ValueError(f"cannot calibrate selection(s) {bad}; available: {', '.join(CAL_SELECTIONS)}")
    if args.sequences <= 0 or args.min_count <= 0 or not 0 < args.queries < args.context:
        raise ValueError("--sequences and --min-count must be positive, and 0 < --queries < --context")
    path = Path(str(DEFAULT_MAPS) if args.maps == "default" else args.maps).with_suffix(".safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"maps file {path} does not exist")
    model, tok, model_id = load_model(args.model, device=args.device)
    check_capturable(model, args.context)
    dev = next(model.parameters()).device
    maps = load_maps(path, model.config, device=dev)
    docs, desc = load_documents(args.data, "validation", args.text_field)
    seqs = pack_sequences(tok, docs, args.context, args.sequences, seed=args.seed)
    t0 = time.perf_counter()
    fit = Fitter(maps, sels, args.sink, args.window)
    for i in range(seqs.shape[0]):
        cap = capture(model, seqs[i:i + 1].to(dev))
        fit.add(cap, args.queries)
        del cap
        print(f"sequence {i + 1}/{seqs.shape[0]} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    info = {"model": model_id, "data": desc, "data_sha": text_sha(docs), "context": args.context,
            "queries": args.queries, "sink": args.sink, "window": args.window, "seed": args.seed,
            "device": str(dev), "seconds": round(time.perf_counter() - t0, 1),
            "command": "hashattention calibrate " + " ".join(sys.argv[2:])}
    cals = fit.result(args.min_count, info)
    out = save_calibrations(cals, path, args.out)
    for c in cals:  # how steep the fitted tables are: mass of a top-scoring key over a median one
        lw = c.log_weight
        print(f"{c.selection}: {tuple(lw.shape)}; per-key mass, best score / middle score, median over layers and "
              f"heads: {float((lw[..., -1] - lw[..., lw.shape[-1] // 2]).exp().median()):.1f}x")
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s; file beside the maps: {calibration_path(path)})")
    return 0
