"""Top SASS lines of an `ncu --page source --print-source sass --csv` export by a metric column (default: L2
excessive global sectors), to find which instructions cause uncoalesced traffic.
    python3 bench/ncu_top_sass.py export.csv [column substring] [n]"""
import csv
import sys

path = sys.argv[1]
key = sys.argv[2] if len(sys.argv) > 2 else "Excessive"
n = int(sys.argv[3]) if len(sys.argv) > 3 else 25
rows = list(csv.reader(open(path, errors="replace")))
head_i = next(i for i, r in enumerate(rows) if any("Source" in c for c in r))
head = rows[head_i]
cols = [i for i, c in enumerate(head) if key.lower() in c.lower()]
src = next(i for i, c in enumerate(head) if c.strip() == "Source")
print("columns:", [head[i] for i in cols])


def num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


body = [r for r in rows[head_i + 1:] if len(r) == len(head)]
for c in cols:
    print(f"== top by {head[c]}")
    for r in sorted(body, key=lambda r: -num(r[c]))[:n]:
        if num(r[c]) > 0:
            print(f"{num(r[c]):>12.0f}  {r[src][:110]}")
