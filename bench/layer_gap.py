"""Per-layer gap between the hash maps and the oracle top-k on the queries that produce a suite answer.

For each prompt of the given tasks, the true answer is appended and the model reads prompt + answer once
(dense, every layer captured); the queries are the positions that predict the answer's tokens. Per layer:
recall of the oracle's heavy keys by the maps' selection (per KV group, the library's rule) and the relative
error of the attention output for the maps and for the oracle, at one budget. Where the oracle's error is
small but the maps' is large, the layer's attention is concentrated on keys the 32 bits do not find.

    .venv/bin/python bench/layer_gap.py --tasks niah_single_noise,niah_single_text --length 4096 --samples 6 \
        --budget 1/32 --out runs/layer_gap.json        # CPU: about 4 minutes
"""
import argparse
import json

import torch

from hashattention.core.budget import parse_heavy
from hashattention.evaluation.ruler import check_tasks, make_sample
from hashattention.models import load_model
from hashattention.shipped import load_default_maps
from hashattention.training.capture import capture
from hashattention.training.recall import evaluate_layers

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--tasks", default="niah_single_noise,niah_single_text")
p.add_argument("--length", type=int, default=4096)
p.add_argument("--samples", type=int, default=6, help="prompts per task (indices 100+, not the suite's own)")
p.add_argument("--budget", default="1/32")
p.add_argument("--out", default="runs/layer_gap.json")
args = p.parse_args()
budget = parse_heavy(args.budget)
model, tok, model_id = load_model("default")
dev = next(model.parameters()).device
maps = load_default_maps(model)
res = {}
for task in check_tasks(args.tasks):
    rows = []
    for i in range(args.samples):
        s = make_sample(tok, task, args.length, 100 + i)
        ans = tok(s.answers[0], add_special_tokens=False).input_ids
        cap = capture(model, torch.tensor([s.ids + ans], device=dev))
        ev = evaluate_layers({"maps": maps}, cap, budgets=(budget,), queries=len(ans) + 1)
        b = next(iter(ev["maps"]))
        rows.append({"recall": ev["maps"][b]["recall"], "error": ev["maps"][b]["rel_error"],
                     "oracle_error": ev["oracle"][b]["rel_error"]})
    res[task] = {k: [sum(r[k][layer] for r in rows) / len(rows) for layer in range(len(rows[0][k]))] for k in rows[0]}
    print(task, "mean error", sum(res[task]["error"]) / len(res[task]["error"]),
          "oracle", sum(res[task]["oracle_error"]) / len(res[task]["oracle_error"]), flush=True)
print("layer | " + " | ".join(f"{t}: recall, error, oracle error" for t in res))
for layer in range(len(next(iter(res.values()))["error"])):
    print(layer, "|", " | ".join(f"{r['recall'][layer]:.2f} {r['error'][layer]:.3f} {r['oracle_error'][layer]:.3f}"
                                 for r in res.values()))
with open(args.out, "w") as f:
    json.dump({"model": model_id, "length": args.length, "samples": args.samples, "budget": args.budget,
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "tasks": res}, f, indent=1)
