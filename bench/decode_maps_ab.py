"""`hashattention bench decode` with the engine's two fused-maps paths in turn, one process, same machine
(session 9): the 16-row tl.dot tile path (the default until then) and the matrix-vector path (one program per
head and sequence, the default up to MAPS_CONFIG['mv_max_batch'] sequences). Arguments after the script
go to `bench decode`; each run writes decode_<device>_<tag>_<path>.{json,md}.

    python3 bench/decode_maps_ab.py --models llama-3.1-8b --contexts 128K --batches 1,7 --out $OUT --tag h200_s9
"""
import sys
import time

import hashattention.engine.kernels as K
from hashattention.cli.main import main

args = sys.argv[1:]
tag = args[args.index("--tag") + 1] if "--tag" in args else "ab"
rest = [a for i, a in enumerate(args) if a != "--tag" and (i == 0 or args[i - 1] != "--tag")]
t0 = time.time()
mv_default = K.MAPS_CONFIG["mv_max_batch"]
for name, mv in (("tile", 0), ("mv", mv_default), ("tile2", 0), ("mv2", mv_default)):
    if name.endswith("2") and time.time() - t0 > 200:
        print(f"skipping the repeat runs ({time.time() - t0:.0f} s so far)", flush=True)
        break
    K.MAPS_CONFIG["mv_max_batch"] = mv
    print(f"== fused maps path: {name} (mv_max_batch={mv})", flush=True)
    main(["bench", "decode", *rest, "--tag", f"{tag}_{name}"])
