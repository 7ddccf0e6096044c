"""SST-2's recurrent recipe (configs/classification.py, recipe=lstm) trained with SEEDS seeds,
each with its own parameter initialisation, dropout and data order, for an ensemble of them.

    python main.py --mode=sweep --sweep=configs/sweeps/sst2_lstm_seeds.py --workdir=runs/sst2_lstm_seeds
    python main.py --mode=eval --workdir=runs/sst2_lstm_seeds --ensemble='runs/sst2_lstm_seeds/seed*'

The first trains seed0, seed1 and seed2 one after another (about 8 minutes each on 2 CPU
cores), the second scores their mean class probabilities on the dev split beside each
member's figures (modes/ensemble.py), from each member's last checkpoint. Three members is
what fits SST-2's 30-minute CPU budget (issue 18). `config.seed` alone does not reorder the
training phrases, so each variant sets `data.shuffle_seed` too: members that read the data
in different orders disagree more (BENCHMARKS.md, "Thirteenth session").
"""

from configs import classification
from configs.sweeps import Sweep, Variant

SEEDS = (0, 1, 2)


def get_sweep() -> Sweep:
  return Sweep(classification.get_config("recipe=lstm"),
               [Variant(f"seed{s}", {"seed": s, "data.shuffle_seed": s},
                        description=f"seed {s}, data order {s}") for s in SEEDS],
               name="sst2_lstm_seeds")
