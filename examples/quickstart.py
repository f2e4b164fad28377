"""The Python API in a dozen lines: compile a spec, load the artifact, generate (batch of 2), print stats.

    python examples/quickstart.py
"""
from pathlib import Path

import dgopt

root = Path(__file__).resolve().parents[1]
art = dgopt.compile(root / "specs" / "greedy.yaml", root / "out" / "quickstart")
dec = dgopt.load(art)
res = dec.generate(["def __init__(self", "import "], max_new_tokens=48)
for prompt, text in zip(["def __init__(self", "import "], res.text):
    print(f"--- {prompt!r}\n{prompt}{text}")
print(res.stats)
