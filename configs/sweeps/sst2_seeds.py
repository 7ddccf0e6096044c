"""SST-2's CPU recipe (configs/classification.py, SST2_CPU) trained with SEEDS seeds of the
parameter initialisation and dropout, for an ensemble of them. The members read the training
phrases in one order (`config.seed` does not set `data.shuffle_seed`; the figures in
BENCHMARKS.md were measured so); configs/sweeps/sst2_lstm_seeds.py varies both.

    python main.py --mode=sweep --sweep=configs/sweeps/sst2_seeds.py --workdir=runs/sst2_seeds
    python main.py --mode=eval --workdir=runs/sst2_seeds --ensemble='runs/sst2_seeds/seed*'

The first trains the variants seed0 ... seed4 one after another (about 4.3 minutes each on
2 CPU cores, so about 22 minutes), each an ordinary classifier workdir with its own word
vocabulary; the second scores their mean class probabilities on the dev split and prints
each member's figures beside the ensemble's (modes/ensemble.py). --checkpoint=latest (the
default) takes each member's last step, chosen by nothing but the step count; best would
take each member's step of highest dev accuracy, a choice made on the split it scores.
Five members is what fits SST-2's 30-minute CPU budget with room to spare (issue 18).
"""

from configs import classification
from configs.sweeps import Sweep, Variant

SEEDS = (0, 1, 2, 3, 4)


def get_sweep() -> Sweep:
  return Sweep(classification.get_config(),
               [Variant(f"seed{s}", {"seed": s}, description=f"seed {s}") for s in SEEDS],
               name="sst2_seeds")
