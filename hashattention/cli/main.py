"""`hashattention` command line. Each subcommand lives in its own module with ``add_parser(sub)`` that
registers its arguments and sets ``func``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

#: subcommand modules, in the order `--help` lists them
COMMANDS = ["demo", "generate", "train", "eval", "recall", "calibrate", "import_maps", "bench", "memory"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hashattention",
                                description="Learned-signature sparse attention for Hugging Face models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"hashattention.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"hashattention.cli.{name}":
                continue  # command not built in this version
            raise
        mod.add_parser(sub)
    return p


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, TypeError) as e:  # bad input: one clear line, no traceback
        if os.environ.get("HASHATTENTION_DEBUG"):
            raise
        print(f"hashattention {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            print(f"hashattention {args.command}: out of GPU memory ({e}). Try a smaller batch, context or "
                  "budget, or --device cpu.", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
