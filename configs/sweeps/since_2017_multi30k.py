"""Since 2017, the encoder-decoder set: a few components on Multi30k de->en.

    python main.py --mode=sweep --sweep=configs/sweeps/since_2017_multi30k.py \\
        --workdir=runs/since_2017_multi30k
    python docs/since_2017.py runs/since_2017_multi30k \\
        --sweep=configs/sweeps/since_2017_multi30k.py

The base is the Table 3 sweep's (configs/sweeps/table3_multi30k.py: post-norm, d_model 128,
4 heads, 2+2 layers, d_ff 512, dropout 0.1, label smoothing 0.1, STEPS updates, greedy BLEU).
The rows are the components of configs/sweeps/since_2017.py that touch all three attention
kinds and both stacks (norm, positions, feed-forward) and all of them together; rotary
positions act in self-attention only (cross-attention has no positions of its own). The
gated feed-forward uses d_ff 341, as there. Seeds 0 and 1 of each row (rows `<name>` and
`<name>_s1`), so docs/since_2017.py can say which differences exceed the seed-to-seed
spread. "modern" unties the output, which on this 8,000-piece vocabulary adds 47% to the
parameters (docs/since_2017.md); "modern_tied" is the same nine-part change with the output
tied, so without that extra matrix (the table prints each row's parameter count).
"""

from configs.sweeps import Sweep, since_2017, table3_multi30k

ROWS = [row for row in since_2017.ROWS
        if row[0] in ("base", "pre_norm", "rms_norm", "rope", "swiglu", "modern")] + [
    ("modern_tied", {**since_2017.MODERN, "model.tie_output": True}, "all",
     "modern with the output tied to the embedding")]


def get_sweep() -> Sweep:
  base = table3_multi30k.get_sweep().base
  return Sweep(base, since_2017.seeded(ROWS))
