"""Translation on real data: Multi30k from local files, or a tensorflow-datasets set by name.

    python main.py --config=configs/translation.py --workdir=runs/m30k \\
        --config.data.data_dir=../shared/data/multi30k               # Multi30k de->en, CPU
    python main.py --config=configs/translation.py:direction=en-de --workdir=runs/m30k_en_de \\
        --config.data.data_dir=../shared/data/multi30k
    python main.py --config=configs/translation.py:dataset=wmt14_de_en,size=base,accel=gpu \\
        --workdir=runs/wmt14

Variant keys: dataset (multi30k, wmt14_de_en, wmt17_de_en, ted_pt_en), direction (the
language pair source-target, e.g. en-de to reverse), size (tiny, small, base, big), accel
(cpu, gpu, tpu). The multi30k default is the CPU recipe whose results BENCHMARKS.md reports.
"""

from configs import default, presets

# variant name -> (config.data.dataset, source-target language pair of the data)
DATASETS = {
    "multi30k": ("files", "de-en"),
    "wmt14_de_en": ("wmt14_translate/de-en", "de-en"),
    "wmt17_de_en": ("wmt17_translate/de-en", "de-en"),
    "ted_pt_en": ("ted_hrlr_translate/pt_to_en", "pt-en"),
}


def get_config(arg=None):
  variant = presets.parse_variant(arg, {"dataset": tuple(DATASETS), "direction": None,
                                        "size": tuple(presets.SIZES),
                                        "accel": tuple(presets.ACCELERATORS)})
  name = variant.get("dataset", "multi30k")
  c = default.get_config(f"task=translation,size={variant.get('size', 'small')},"
                         f"accel={variant.get('accel', 'cpu')}")
  c.data.dataset, c.data.language_pair = DATASETS[name]
  c.data.language_pair = variant.get("direction", c.data.language_pair)
  c.data.max_input_length = 64  # training rows: examples longer than this are dropped (counted)
  c.data.max_target_length = 64
  c.data.max_eval_length = 128
  c.model.tokenizer = "sentencepiece"
  c.model.vocab_size = 8000
  c.model.shared_vocab = True
  c.data.pack_examples = True
  c.optim.label_smoothing = 0.1
  c.decode.beam_size = 4
  c.decode.length_penalty = 0.6
  c.decode.decode_extra_length = 50
  c.eval.best_metric = "bleu"
  # What --mode=average averages by default (--num_average=5; the paper's base models
  # average the last 5 checkpoints): one run keeps 5 + the best on disk, not 20.
  c.train.keep_checkpoints = 5
  c.eval.num_decode_batches = 4
  c.eval.num_print_examples = 3
  if name == "multi30k":
    # 29k sentence pairs: the small model (3+3 layers, d=256) on packed 64 x 64-token
    # rows; 1,500 steps (about 12 epochs) take about an hour on a 2-core CPU. The learning
    # rate anneals to 0 by the end of that budget, and checkpoints every 100 steps let
    # --mode=average average the last five.
    c.data.file_splits = "train=train,validation=val,test=test_2016_flickr"
    c.train.batch_size = 64
    c.optim.learning_rate = 1.5e-3
    c.optim.warmup_steps = 400
    c.optim.schedule = "cosine"
    c.train.num_train_steps = 1500
    c.eval.eval_every_steps = 250
    c.eval.num_decode_batches = 2
    c.train.checkpoint_every_steps = 100
    c.train.log_every_steps = 50
  else:
    c.model.vocab_size = 32000  # the paper's shared source-target vocabulary size
    c.data.max_input_length = c.data.max_target_length = 256
    c.data.max_eval_length = 256
    c.train.num_train_steps = 100_000
    c.eval.eval_every_steps = c.train.checkpoint_every_steps = 5000
  return c
