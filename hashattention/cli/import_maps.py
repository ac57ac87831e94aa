"""`hashattention import-maps`: convert the paper authors' published map files into our maps format."""
from __future__ import annotations

from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("import-maps", help="import the authors' HashAttention-1.0 map files (USA layout)",
                       description="Read a state dict of the official HashAttention-1.0 code (per layer, per query "
                                   "head, Linear layers 0/2/4 for q and k; torch.load with weights_only=True) and "
                                   "write it as hashattention maps (.safetensors + .json).")
    p.add_argument("file", help="the authors' .pt/.pth (or .safetensors) state dict")
    p.add_argument("--out", required=True, help="output maps file")
    p.add_argument("--model", default=None,
                   help="model the maps belong to (config read for the KV heads and checked against the maps)")
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads of the model, when --model is not given")
    p.add_argument("--model-id", default="", help="model id recorded in the maps (default: --model)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch

    from ..training.authors import import_usa, load_state_dict
    from ..weights import check_maps_match_model, save_maps

    if not Path(args.file).is_file():
        raise FileNotFoundError(f"map file {args.file} does not exist")
    model_config, model_type = None, ""
    if args.model:
        from transformers import AutoConfig
        model_config = AutoConfig.from_pretrained(args.model)
        model_type = model_config.model_type
        kv = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    elif args.kv_heads:
        kv = args.kv_heads
    else:
        raise ValueError("give --model (a folder or hub id) or --kv-heads: the file does not record the KV heads")
    maps = import_usa(load_state_dict(args.file), kv, model_id=args.model_id or args.model or "",
                      model_type=model_type)
    if model_config is not None:
        check_maps_match_model(maps.config, model_config, allow_other_model=True)
    maps.config.extra["source_file"] = Path(args.file).name
    path = save_maps(maps.to(getattr(torch, args.dtype)), args.out)
    c = maps.config
    print(f"wrote {path}: {c.num_layers} layers, {c.num_q_heads} query heads ({c.num_kv_heads} KV heads), "
          f"head_dim {c.head_dim}, depth {c.depth}, {c.bits} bits, one key map per query head")
    return 0
