#!/usr/bin/env bash
# The README's demo: install, compile specs/greedy.yaml (the project's own trained code-tiny model), generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh test
DG=.venv/bin/dgopt
$DG compile specs/greedy.yaml -o out/greedy
$DG inspect out/greedy --no-browser
for p in "def __init__(self" "import "; do
  echo "----- prompt: $p"
  $DG run out/greedy --prompt "$p" --max-new-tokens 64
done
$DG compile specs/sample.yaml -o out/sample -q >/dev/null
echo "----- sampled (temperature 0.8, top-k 40, min-p 0.05, seed 0)"
$DG run out/sample --prompt "class " --max-new-tokens 64
$DG compile specs/lookahead.yaml -o out/lookahead -q >/dev/null
echo "----- lookahead (W5 N4 G5, plain greedy: token-identical to transformers greedy, in fewer steps)"
$DG run out/lookahead --prompt "class Foo:
    def " --max-new-tokens 64
$DG compile specs/speculative.yaml -o out/speculative -q >/dev/null
echo "----- speculative: code-draft-sd proposes k tokens (k adapts per step), code-tiny verifies them, both in ONE step graph (greedy, same tokens)"
$DG run out/speculative --prompt "class Foo:
    def " --max-new-tokens 64
$DG compile specs/uag.yaml -o out/uag -q >/dev/null
echo "----- UAG: proposals from code-draft-xtok-sd, a draft with another tokenizer (greedy, same tokens)"
$DG run out/uag --prompt "class Foo:
    def " --max-new-tokens 64
$DG compile specs/recycle.yaml -o out/recycle -q >/dev/null
echo "----- recycle (RecycleGPT/EAGLE): code-tiny-recycle drafts from code-tiny's own hidden states, code-tiny verifies (greedy, same tokens)"
$DG run out/recycle --prompt "class Foo:
    def " --max-new-tokens 64
$DG compile specs/jacobi-cllm.yaml -o out/jacobi-cllm -q >/dev/null
echo "----- Jacobi (block 4, n-gram guesses) on code-tiny-cllm, code-tiny consistency-trained (CLLM): its own greedy output, in fewer steps"
$DG run out/jacobi-cllm --prompt "    for i in range(" --max-new-tokens 64
