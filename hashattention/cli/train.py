"""`hashattention train`: learn the maps of a frozen model from long text."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from . import layer_list


def add_parser(sub):
    p = sub.add_parser("train", help="train the hash maps of a model on long text",
                       description="Run the frozen model over long text (chunked prefill), collect every layer's "
                                   "queries/keys/values and train phi_q / phi_kv to find each query's heaviest keys.")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a folder, .gguf or hub id")
    p.add_argument("--data", default="pydoc",
                   help="'pydoc' (Python standard-library docs, offline; held-out modules excluded), a .txt/.jsonl/.md "
                        "or plain-text file, a folder of them (files without an extension included), or a "
                        "Hugging Face dataset name")
    p.add_argument("--text-field", default="text", help="field of jsonl rows / dataset rows holding the text")
    p.add_argument("--heldout", default=None,
                   help="text for the held-out recall in the progress bar (default: pydoc:heldout)")
    p.add_argument("--out", required=True, help="output maps file (.safetensors + .json)")
    p.add_argument("--context", type=int, default=8192, help="training sequence length in tokens")
    p.add_argument("--lengths", default="", metavar="N,N,...",
                   help="mixed lengths (e.g. 2K,4K,8K): sequence i is cut into pieces of the i-th length in turn, "
                        "each prefilled from position 0, so the maps also learn shorter contexts' positions "
                        "(default: whole --context sequences)")
    p.add_argument("--sequences", type=int, default=None, help="at most this many training sequences (default: all)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the data (reshuffled each pass)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this much training time")
    p.add_argument("--qchunk", type=int, default=256, help="queries per optimizer step")
    p.add_argument("--prefill-chunk", type=int, default=1024, help="tokens per prefill chunk of the frozen model")
    p.add_argument("--topk", type=int, default=32, help="positive keys per query")
    p.add_argument("--target", choices=["group", "head"], default="group",
                   help="heaviest keys of each KV group (matches per-group selection) or of each query head (paper)")
    p.add_argument("--score", choices=["weight", "weight_vnorm"], default="weight",
                   help="rank keys by attention weight, or weight x ||v|| (Lemma 4.2)")
    p.add_argument("--alpha", type=float, default=20.0, help="class-1 weight alpha (+ beta * context)")
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--threshold", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-decay", choices=["none", "cosine"], default="none",
                   help="cosine: the learning rate falls to 0 over the run (its steps, or --max-seconds if sooner)")
    p.add_argument("--layers", default="", metavar="I,I,...",
                   help="train only these layers' maps (e.g. 7,20), the others kept from --init (required); only "
                        "their targets are computed, so a run costs about their share of a full one")
    p.add_argument("--relax", choices=["tanh", "ste"], default="tanh",
                   help="the sign's relaxation in the loss: tanh (paper), or ste (the hard bits forward, tanh's "
                        "gradient back: the loss sees the scores the selection ranks by)")
    p.add_argument("--query-weight", choices=["uniform", "mass"], default="uniform",
                   help="mass: each query's loss weighted by the attention weight its candidate keys hold (queries "
                        "that read only sink and window have nothing to find)")
    p.add_argument("--bits", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--key-heads", choices=["kv", "q"], default="kv", help="one key map per KV head or per query head")
    p.add_argument("--value-norm", action="store_true", help="key maps also read log||v||")
    p.add_argument("--sink", type=int, default=128)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--questions", type=int, default=0, metavar="N",
                   help="mix N retrieval questions over the training text into the data (facts hidden in it, a "
                        "question and its answer; only those queries train: the queries that read far back). "
                        "Lengths: --lengths, else context/4, /2 and /1 in turn. Never the suite's prompts")
    p.add_argument("--finetune-passkey", type=int, default=0, metavar="N",
                   help="mix N synthetic passkey prompts into the data (task fine-tuning; generic maps use 0)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="dtype of the saved maps")
    p.add_argument("--resume", action="store_true", help="continue from OUT.ckpt.pt when it exists")
    p.add_argument("--init", default=None, metavar="MAPS",
                   help="start from these maps ('shipped' or a maps file; same shape): longer training of a file")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bucket-projection", default=None, metavar="VARIANT",
                   help="instead of maps: fit the learned projection of a bucket-hashing variant (e.g. "
                        "bucket-lsh_b8_proj) on the same data; writes OUT.safetensors + OUT.json")
    p.add_argument("--ridge", type=float, default=1e-2, help="ridge of --bucket-projection's closed-form fit")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
    return p


def _check_data_arg(data: str):
    from ..training.corpus import PYDOC, TEXT_SUFFIXES, data_files, looks_local
    if data.startswith(PYDOC):
        return
    p = Path(data)
    if (p.suffix in TEXT_SUFFIXES or data.startswith((".", "/", "~"))) and not p.exists():
        raise FileNotFoundError(f"training data {data} does not exist")
    if looks_local(data):
        data_files(data)  # a missing path or a folder without text files: said before the model loads
    if p.is_file() and p.stat().st_size == 0:
        raise ValueError(f"training data {data} is empty")


def _fit_bucket_projection(args, model, model_id, seqs, desc, log) -> int:
    """The ``proj`` aggregation of bucket hashing (docs/bucket-hash-report.md): a closed-form ridge fit per
    layer and head from the bucket's mean value to the model's dense attention output."""
    from tqdm.auto import tqdm

    from ..core.budget import Budget
    from ..policies.bucket import fit_projection
    from ..policies.bucket import parse_variant
    cls, kw = parse_variant(args.bucket_projection)
    kw["agg"] = "proj"
    pol = cls(Budget(heavy="1/16", sink=args.sink, window=args.window), **kw)
    log(f"fitting the bucket projection of {args.bucket_projection} for {model_id} on {seqs.shape[0]} sequences "
        f"x {args.context} tokens of {desc}")
    t = time.perf_counter()
    with tqdm(total=seqs.shape[0], unit="seq", disable=args.quiet) as bar:
        res = fit_projection(model, pol, seqs, ridge=args.ridge, progress=bar)
    out = Path(args.out).with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    pol.save_projection(str(out))
    res.update({"seconds": round(time.perf_counter() - t, 1), "sequences": seqs.shape[0], "context": args.context,
                "ridge": args.ridge, "data": desc, "variant": args.bucket_projection, "model": model_id,
                "config": pol.config()})
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    print(json.dumps({"out": str(out), **{k: v for k, v in res.items() if k != "config"}}))
    return 0


def run(args) -> int:
    import torch

    from ..models import load_model
    from ..training.capture import check_capturable
    from ..training.corpus import load_documents, pack_sequences, text_sha
    from ..training.trainer import TrainConfig, train
    from ..weights import maps_config_for, save_maps

    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    if args.bucket_projection:  # a bad variant name fails before the model loads
        from ..policies.bucket import parse_variant
        parse_variant(args.bucket_projection)
    from ..engine.memory import parse_tokens
    lengths = tuple(parse_tokens(x.strip()) for x in args.lengths.split(",") if x.strip())
    tc = TrainConfig(context=args.context, qchunk=args.qchunk, topk=args.topk, target=args.target, score=args.score,
                     alpha=args.alpha, beta=args.beta, threshold=args.threshold, lr=args.lr, sink=args.sink,
                     window=args.window, prefill_chunk=args.prefill_chunk, max_seconds=args.max_seconds,
                     seed=args.seed, lengths=lengths, lr_decay=args.lr_decay, query_weight=args.query_weight,
                     relax=args.relax, layers=layer_list(args.layers))
    if tc.layers and not args.init:
        raise ValueError("--layers trains only some layers and keeps the others' maps: give --init (e.g. shipped)")
    if args.epochs <= 0:
        raise ValueError(f"--epochs must be positive, got {args.epochs}")
    if args.questions < 0:
        raise ValueError(f"--questions must be 0 or more, got {args.questions}")
    if args.sequences is not None and args.sequences <= 0:
        raise ValueError(f"--sequences must be positive, got {args.sequences}")
    _check_data_arg(args.data)
    t_start = time.perf_counter()
    docs, desc = load_documents(args.data, "train", args.text_field)  # bad data fails before the model loads
    model, tok, model_id = load_model(args.model, device=args.device)
    check_capturable(model, args.context)
    mc = maps_config_for(model.config, bits=args.bits, hidden=args.hidden, depth=args.depth,
                         value_norm=args.value_norm)
    if args.key_heads == "q":
        mc.key_heads = mc.num_q_heads
    seqs = pack_sequences(tok, docs, args.context, args.sequences, seed=args.seed)
    if args.finetune_passkey:
        from ..evaluation.passkey import passkey_prompt
        extra = []
        for i in range(args.finetune_passkey):  # seeds far from the evaluation's
            ids, _ = passkey_prompt(tok, args.context, 10**7 + i)
            extra.append(torch.nn.functional.pad(ids[0, :args.context], (0, max(0, args.context - ids.shape[1])),
                                                 value=tok.eos_token_id or 0))
        seqs = torch.cat([seqs, torch.stack(extra)])[torch.randperm(seqs.shape[0] + len(extra),
                                                                    generator=torch.Generator().manual_seed(args.seed))]
        desc += f" + {args.finetune_passkey} passkey prompts"
    questions = []
    if args.questions:
        from ..training.questions import question_prompts
        qlen = lengths or tuple(max(tc.first_query + 64, args.context // d) for d in (4, 2, 1))
        questions = question_prompts(tok, docs, args.questions, qlen, args.seed)
        desc += f" + {args.questions} retrieval questions"
        qg = torch.Generator().manual_seed(args.seed + 2)
        questions = [questions[j] for _ in range(args.epochs) for j in torch.randperm(len(questions), generator=qg)]
    if args.epochs > 1:
        g = torch.Generator().manual_seed(args.seed + 1)
        seqs = torch.cat([seqs] + [seqs[torch.randperm(seqs.shape[0], generator=g)] for _ in range(args.epochs - 1)])
    if args.bucket_projection:
        return _fit_bucket_projection(args, model, model_id, seqs, desc, log)
    held_name = args.heldout or "pydoc:heldout"
    held_docs, _ = load_documents(held_name, "validation", args.text_field)
    held = pack_sequences(tok, held_docs, args.context, 1, seed=args.seed)
    log(f"training maps for {model_id}: {seqs.shape[0]} sequences x {args.context} tokens of {desc}"
        + (f" (cut into pieces of {', '.join(map(str, lengths))} in turn)" if lengths else "") + "; "
        f"target {args.target}/{args.score}, top-{args.topk}, alpha {args.alpha}")
    tc.extra = {"data": desc, "epochs": args.epochs, "data_sha": text_sha(docs), "heldout": held_name,
                "command": "hashattention train " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["train"] else ""}
    init = None
    if args.init:
        from ..shipped import load_default_maps
        from ..weights import load_maps
        init = load_default_maps(model) if args.init == "shipped" else load_maps(args.init, model.config)
        prev = init.config.extra
        tc.extra.update(init=args.init, init_seconds=prev.get("seconds"), init_tokens=prev.get("tokens"))
    maps = train(model, seqs, mc, tc, heldout=held, checkpoint=str(Path(args.out).with_suffix("")) + ".ckpt.pt",
                 resume=args.resume, progress=not args.quiet, log=log, init=init, questions=questions)
    maps = maps.to(getattr(torch, args.dtype))
    path = save_maps(maps, args.out)
    e = maps.config.extra
    log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {e['tokens']} tokens, {e['steps']} steps, "
        f"{e['seconds']} s training on {e['device']} ({time.perf_counter() - t_start:.0f} s in all), "
        f"loss {e['final_loss']}, held-out recall@1/16 {e['heldout_recall_1_16']}")
    print(json.dumps({"out": str(path), **e}))
    return 0
