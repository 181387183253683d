"""Instruction mix of the largest loop in an nvdisasm listing (stdin)."""
import collections
import re
import sys

lines = sys.stdin.read().splitlines()
best = None
for i, l in enumerate(lines):
    m = re.search(r"BRA `\((\.L_x_\d+)\)", l)
    if not m:
        continue
    j = [k for k, x in enumerate(lines) if x.strip().startswith(m.group(1) + ":")]
    if j and j[0] < i and (best is None or i - j[0] > best[1] - best[0]):
        best = (j[0], i)
ops = collections.Counter()
for l in lines[best[0]:best[1] + 1]:
    m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", l)
    if m:
        ops[m.group(1).split(".")[0]] += 1
print("loop instructions", sum(ops.values()))
print(", ".join(f"{o} {c}" for o, c in ops.most_common(24)))
