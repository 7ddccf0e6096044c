"""Hugging Face GPT-2 and Marian models in and out, checked against `transformers` itself.

Tiny random models are built with `transformers` here (2 layers, small widths,
`save_pretrained` to a temporary folder: nothing is downloaded), with tokenizers trained
on lines of the local corpora (or generated text where they are absent). The oracle is
always `transformers`: logits on random tokens, greedy decodes through the cache, the
tokenizers' ids, and the exported folders loaded back by `from_pretrained`.

torch and transformers are test-only (requirements-pretrained.txt, which .ci/run installs;
a CPU build of torch is enough). Where they are absent these tests are skipped.
"""

import gzip
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -r "
                            "requirements-pretrained.txt; a CPU build is enough)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(pip install -r requirements-pretrained.txt)")

import pretrained  # noqa: E402
from models import decoding  # noqa: E402
from models.transformer import DecoderOnly, EncoderDecoder, TransformerConfig  # noqa: E402
from modes import export  # noqa: E402
from pretrained import gpt2, marian, tokenizer_files  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from tests.model_fixtures import init_params  # noqa: E402
from tests.tiny_configs import tiny_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data")
ATOL = 1e-4  # float32 logits of O(1) size through 2 layers
STEPS = 20  # greedy tokens compared


def corpus_lines(path: str, count: int, seed: int = 0):
  """`count` lines of a local corpus, or generated sentences where it is absent."""
  if os.path.exists(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
      lines = [line.strip() for line in f if line.strip()]
    return lines[:count]
  words = "the a man woman dog runs sits on in with red blue house street play ball".split()
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(count)]


def randomize(model, skip=()):
  """Parameters of a visible size (transformers initialises with std 0.02, which makes
  every logit nearly equal and a comparison weak)."""
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not any(s in name for s in skip):
        p.normal_(0.0, 0.3 if p.ndim > 1 else 0.1)
        if p.ndim == 1 and name.endswith("weight"):  # norm scales around 1
          p.add_(1.0)
  return model.eval()


# ----------------------------------------------------------------------------- folders


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
  from tokenizers import ByteLevelBPETokenizer  # pylint: disable=g-import-not-at-top
  folder = str(tmp_path_factory.mktemp("gpt2"))
  lines = corpus_lines(os.path.join(DATA, "tinyshakespeare", "input.txt.gz"), 5000)
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(lines, vocab_size=300, min_frequency=2,
                          special_tokens=["<|endoftext|>"], show_progress=False)
  fast = transformers.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer,  # pylint: disable=protected-access
                                        eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
  eos = fast.convert_tokens_to_ids("<|endoftext|>")
  config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(fast),
                                   n_positions=64, bos_token_id=eos, eos_token_id=eos)
  randomize(transformers.GPT2LMHeadModel(config)).save_pretrained(folder)
  fast.save_pretrained(folder)
  return folder


@pytest.fixture(scope="module")
def marian_folder(tmp_path_factory):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  folder = str(tmp_path_factory.mktemp("marian"))
  pieces = {}
  for side, lang in (("source", "de"), ("target", "en")):
    lines = corpus_lines(os.path.join(DATA, "multi30k", f"train.{lang}.gz"), 3000)
    prefix = os.path.join(folder, side)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix,
                                   vocab_size=150, model_type="unigram", minloglevel=2,
                                   bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1)
    os.replace(prefix + ".model", os.path.join(folder, f"{side}.spm"))
    processor = spm.SentencePieceProcessor(model_file=os.path.join(folder, f"{side}.spm"))
    pieces.update({processor.id_to_piece(i): None for i in range(1, processor.get_piece_size())})
  vocab = {"</s>": 0, "<unk>": 1}
  for piece in pieces:
    vocab.setdefault(piece, len(vocab))
  vocab["<pad>"] = len(vocab)
  with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f)
  tokenizer = transformers.MarianTokenizer(os.path.join(folder, "source.spm"),
                                           os.path.join(folder, "target.spm"),
                                           os.path.join(folder, "vocab.json"))
  pad = vocab["<pad>"]
  config = transformers.MarianConfig(
      vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2,
      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
      decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=pad,
      decoder_start_token_id=pad, eos_token_id=0, forced_eos_token_id=None,
      scale_embedding=True, activation_function="swish")
  model = randomize(transformers.MarianMTModel(config), skip=("embed_positions",))
  with torch.no_grad():
    model.final_logits_bias.normal_(0.0, 0.5)
  model.save_pretrained(folder)
  tokenizer.save_pretrained(folder)
  return folder


def imported(folder, family_class):
  config, module = pretrained.module_of(folder)
  vocab = module.vocabulary(config)
  fields = module.model_fields(config, folder)
  cfg = TransformerConfig.from_fields(fields, vocab_size=vocab.size, max_length=32,
                                      dropout_rate=0.0)
  params = module.params_from(pretrained.read_weights(folder), config, vocab, 32, folder)
  return family_class(cfg), cfg, params, vocab


def our_greedy(cfg, family_class, params, tokens, prompt_length, encoded=None, source=None):
  """Cached greedy decoding of the model (`decoding.greedy_decode`)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  decoder = family_class(dataclasses.replace(cfg, decode=True))
  if source is None:
    cache = decoding.init_cache(decoder, tokens)

    def step(c, token):
      logits, v = decoder.apply({"params": params, "cache": c}, token, mutable=["cache"])
      return logits[:, 0], v["cache"]
  else:
    cache = decoding.init_cache(decoder, source, tokens)

    def step(c, token):
      logits, v = decoder.apply({"params": params, "cache": c}, encoded, source, token,
                                method=EncoderDecoder.decode, mutable=["cache"])
      return logits[:, 0], v["cache"]
  prompt = jnp.zeros_like(tokens).at[:, :prompt_length].set(tokens[:, :prompt_length])
  return np.asarray(jax.jit(lambda c, p: decoding.greedy_decode(
      step, c, tokens.shape[0], tokens.shape[1], 1, prompt=p))(cache, prompt))


# ----------------------------------------------------------------------------- GPT-2


def test_gpt2_import_gives_transformers_logits(gpt2_folder):
  model, _, params, vocab = imported(gpt2_folder, DecoderOnly)
  hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
  eos = hf.config.eos_token_id
  x = np.random.default_rng(0).integers(0, hf.config.vocab_size, (3, 12))
  to_ours = vocab.to_ours()
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(to_ours[x])))
  with torch.no_grad():  # GPT-2 reads a text after <|endoftext|>; ours after its start symbol
    theirs = hf(torch.tensor(np.concatenate([np.full((3, 1), eos), x], 1))).logits.numpy()
  np.testing.assert_allclose(ours[..., to_ours], theirs[:, :-1], atol=ATOL)
  assert np.abs(theirs).max() > 1.0  # a comparison of visible logits
  assert (ours[..., [0, 2]] < -1e8).all()  # ids with no GPT-2 token are never predicted


def test_gpt2_greedy_decoding_through_the_cache_equals_generate(gpt2_folder):
  model, cfg, params, vocab = imported(gpt2_folder, DecoderOnly)
  hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
  eos = hf.config.eos_token_id
  prompt = np.random.default_rng(1).choice(
      [i for i in range(hf.config.vocab_size) if i != eos], (2, 4))
  with torch.no_grad():  # after <|endoftext|>, which our start symbol stands for
    theirs = hf.generate(torch.tensor(np.pad(prompt, ((0, 0), (1, 0)), constant_values=eos)),
                         max_new_tokens=STEPS, do_sample=False, pad_token_id=eos).numpy()[:, 1:]
  to_ours = vocab.to_ours()
  tokens = jnp.zeros((2, 4 + STEPS), jnp.int32).at[:, :4].set(to_ours[prompt])
  ours = our_greedy(cfg, DecoderOnly, params, tokens, 4)
  for row in range(2):
    expected = to_ours[theirs[row]]
    stop = np.flatnonzero(expected == 1)  # our EOS; HF pads after it with EOS
    expected = expected[:stop[0] + 1] if stop.size else expected
    assert len(expected) >= 4 + STEPS // 2, expected  # most of the 20 steps compared
    np.testing.assert_array_equal(ours[row, :len(expected)], expected)


def test_gpt2_tokenizer_gives_transformers_ids(gpt2_folder):
  ours = tokenizer_files.ByteLevelBPE(gpt2.vocabulary(pretrained.read_config(gpt2_folder)),
                                      gpt2_folder)
  theirs = transformers.AutoTokenizer.from_pretrained(gpt2_folder)
  lines = corpus_lines(os.path.join(DATA, "tinyshakespeare", "input.txt.gz"), 300, seed=1)
  for line in lines:
    ids = ours.encode(line)
    assert ours.original_ids(ids) == theirs(line)["input_ids"], line
    assert ours.decode(ids) == line


# ----------------------------------------------------------------------------- Marian


def test_marian_import_gives_transformers_logits(marian_folder):
  model, _, params, vocab = imported(marian_folder, EncoderDecoder)
  hf = transformers.MarianMTModel.from_pretrained(marian_folder).eval()
  pad = hf.config.pad_token_id
  rng = np.random.default_rng(0)
  src = rng.integers(2, pad, (3, 9))
  src[1, 6:] = pad  # padded source
  tgt = rng.integers(2, pad, (3, 7))
  to_ours = vocab.to_ours()
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(to_ours[src]),
                                jnp.asarray(to_ours[tgt])))
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(src), attention_mask=torch.tensor(src != pad),
                decoder_input_ids=torch.tensor(np.concatenate(
                    [np.full((3, 1), pad), tgt[:, :-1]], 1))).logits.numpy()
  np.testing.assert_allclose(ours[..., to_ours], theirs, atol=ATOL)
  assert np.abs(theirs).max() > 1.0


def test_marian_greedy_decoding_through_the_cache_equals_generate(marian_folder):
  model, cfg, params, vocab = imported(marian_folder, EncoderDecoder)
  hf = transformers.MarianMTModel.from_pretrained(marian_folder).eval()
  pad = hf.config.pad_token_id
  src = np.random.default_rng(2).integers(2, pad, (2, 8))
  with torch.no_grad():
    theirs = hf.generate(torch.tensor(src), max_new_tokens=STEPS, do_sample=False, num_beams=1,
                         bad_words_ids=[[pad]]).numpy()[:, 1:]  # without the start symbol
  to_ours = vocab.to_ours()
  source = jnp.asarray(to_ours[src])
  encoded = model.apply({"params": params}, source, method=EncoderDecoder.encode)
  tokens = jnp.zeros((2, STEPS), jnp.int32)
  ours = our_greedy(cfg, EncoderDecoder, params, tokens, 0, encoded, source)
  for row in range(2):
    expected = to_ours[theirs[row]]
    expected = expected[expected != 0]  # HF pads finished rows
    assert len(expected) >= STEPS // 2, expected
    np.testing.assert_array_equal(ours[row, :len(expected)], expected)


def test_marian_tokenizers_give_transformers_ids(marian_folder):
  config = pretrained.read_config(marian_folder)
  vocab = marian.vocabulary(config)
  theirs = transformers.MarianTokenizer.from_pretrained(marian_folder)
  for side, lang in (("source", "de"), ("target", "en")):
    ours = tokenizer_files.MarianPieces(vocab, marian_folder, side)
    lines = corpus_lines(os.path.join(DATA, "multi30k", f"val.{lang}.gz"), 300, seed=3)
    for line in lines:
      expected = (theirs(line) if side == "source" else theirs(text_target=line))["input_ids"]
      assert ours.original_ids(ours.encode(line)) + [config["eos_token_id"]] == expected, line


# ----------------------------------------------------------------------------- export


def export_folder(tmp_path, config, params):
  arrays, hf_config = export.hf_arrays(config, params)
  folder = str(tmp_path / "exported")
  os.makedirs(folder)
  save_file(arrays, os.path.join(folder, "model.safetensors"))
  pretrained.save_json(os.path.join(folder, "config.json"), hf_config)
  return folder


GPT2_FIELDS = dict(norm_placement="pre", positional_encoding="learned", activation="gelu",
                   scale_embeddings=False, layer_norm_epsilon=1e-5, d_model=32, d_ff=64,
                   num_heads=4, num_decoder_layers=2)
MARIAN_FIELDS = dict(norm_placement="post", positional_encoding="sinusoidal_halves",
                     activation="silu", layer_norm_epsilon=1e-5, logits_bias=True,
                     d_model=32, d_ff=64, num_heads=4, num_encoder_layers=2,
                     num_decoder_layers=2)


def test_exported_gpt2_loads_in_transformers_with_the_same_logits(tmp_path):
  config = tiny_config("generation", model=GPT2_FIELDS)
  cfg = TransformerConfig.from_fields(config.model, vocab_size=40, max_length=16)
  model = DecoderOnly(cfg)
  x = jnp.asarray(np.random.default_rng(0).integers(3, 40, (2, 10)))
  params = init_params(model, x)
  hf = transformers.GPT2LMHeadModel.from_pretrained(export_folder(tmp_path, config, params))
  with torch.no_grad():  # our start symbol (id 0) is the export's first token
    theirs = hf(torch.tensor(np.pad(np.asarray(x), ((0, 0), (1, 0))))).logits.numpy()
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, x)), theirs[:, :-1],
                             atol=ATOL)


def test_exported_marian_loads_in_transformers_with_the_same_logits(tmp_path):
  config = tiny_config("translation", model=MARIAN_FIELDS)
  cfg = TransformerConfig.from_fields(config.model, vocab_size=40, max_length=16)
  model = EncoderDecoder(cfg)
  rng = np.random.default_rng(0)
  src, tgt = (jnp.asarray(rng.integers(3, 40, (2, n))) for n in (9, 7))
  params = init_params(model, src, tgt)
  hf = transformers.MarianMTModel.from_pretrained(export_folder(tmp_path, config, params))
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(np.asarray(src)),
                decoder_input_ids=torch.tensor(np.pad(np.asarray(tgt), ((0, 0), (1, 0)))[:, :-1])
                ).logits.numpy()
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, src, tgt)), theirs,
                             atol=ATOL)


def test_import_then_export_gives_back_the_original_weights(tmp_path, gpt2_folder):
  config = tiny_config("generation")
  config.init_from = gpt2_folder
  pretrained.apply_to_config(config)
  _, _, params, _ = imported(gpt2_folder, DecoderOnly)
  arrays, _ = export.hf_arrays(config, params)
  original = pretrained.read_weights(gpt2_folder)
  for name, value in arrays.items():
    if name != "transformer.wpe.weight":  # the import keeps the positions the run needs
      np.testing.assert_array_equal(value, original[name], err_msg=name)


@pytest.mark.parametrize("task,fields,named", [
    ("generation", {}, ["positional_encoding='sinusoidal'", "scale_embeddings=True",
                        "norm_placement='post'"]),
    ("generation", dict(GPT2_FIELDS, num_kv_heads=2, norm="rms"), ["num_kv_heads=2",
                                                                   "norm='rms'"]),
    ("translation", dict(MARIAN_FIELDS, positional_encoding="sinusoidal"),
     ["positional_encoding='sinusoidal'"]),
    ("translation", dict(MARIAN_FIELDS, layer_norm_epsilon=1e-6), ["layer_norm_epsilon"]),
    ("translation", dict(MARIAN_FIELDS, conv_kernel=3), ["conv_kernel=3"]),
    ("translation", dict(MARIAN_FIELDS, encoder_lstm=True), ["encoder_lstm=True"]),
])
def test_export_refuses_what_the_architecture_cannot_hold(task, fields, named):
  config = tiny_config(task, model=fields)
  with pytest.raises(pretrained.PretrainedError) as error:
    export.hf_arrays(config, {})
  message = str(error.value)
  assert "\n" not in message and all(n in message for n in named), message


# ----------------------------------------------------------------------------- errors


def test_folder_problems_are_one_line_errors(tmp_path, gpt2_folder):
  with pytest.raises(pretrained.PretrainedError,
                     match=r"config\.init_from=.*absent: no such folder.*huggingface-cli"):
    pretrained.read_config(str(tmp_path / "absent"))
  ours = tmp_path / "our_workdir"  # what training writes there, not a Hugging Face config
  ours.mkdir()
  (ours / "config.json").write_text(tiny_config("generation").to_json())
  with pytest.raises(pretrained.PretrainedError,
                     match=r"is a workdir of this codebase.*--workdir=.*init_encoder_from"):
    pretrained.architecture(pretrained.read_config(str(ours)), str(ours))
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "config.json").write_text(open(os.path.join(gpt2_folder, "config.json")).read())
  (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 not read")
  with pytest.raises(pretrained.PretrainedError, match="only safetensors are read"):
    pretrained.read_weights(str(pickled))
  (pickled / "model.safetensors").write_bytes(b"\x00" * 100)
  with pytest.raises(pretrained.PretrainedError, match="damaged or not a safetensors"):
    pretrained.read_weights(str(pickled))
  config = tiny_config("translation")
  config.init_from = gpt2_folder
  with pytest.raises(pretrained.PretrainedError, match="a generation model"):
    pretrained.apply_to_config(config)


def run_main(workdir, *args, stdin=None, stdout_only=False):
  result = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"),
                           f"--workdir={workdir}", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, input=stdin)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout if stdout_only else result.stdout + result.stderr


def test_every_mode_runs_on_an_imported_gpt2(tmp_path, gpt2_folder):
  """Fine-tune (train from the imported weights), then generate, eval and export; the
  export of an imported model loads in transformers."""
  workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
  if not os.path.exists(os.path.join(DATA, "tinyshakespeare")):
    pytest.skip("the local tiny Shakespeare corpus is absent")
  main = lambda *args: run_main(workdir, *args)  # noqa: E731
  main("--config=configs/generation.py", f"--config.init_from={gpt2_folder}",
       "--config.train.num_train_steps=4", "--config.eval.eval_every_steps=1000",
       "--config.compute.cpu_devices=1", "--config.data.max_target_length=32",
       "--config.eval.num_eval_batches=1", "--config.eval.num_print_examples=0")
  assert "ROMEO:" in main("--mode=generate", "--prompt=ROMEO:",
                          "--config.decode.max_new_tokens=5")
  assert "perplexity" in main("--mode=eval")
  assert "exported step 4" in main("--mode=export", f"--output={out}")
  hf = transformers.GPT2LMHeadModel.from_pretrained(out)
  assert hf.config.n_layer == 2
  assert transformers.AutoTokenizer.from_pretrained(out)("ROMEO:")["input_ids"]


def test_an_imported_marian_trains_decodes_and_exports(tmp_path, marian_folder):
  workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
  data = os.path.join(DATA, "multi30k")
  if not os.path.exists(data):
    pytest.skip("the local Multi30k corpus is absent")
  run_main(workdir, "--config=configs/translation.py", f"--config.data.data_dir={data}",
           f"--config.init_from={marian_folder}", "--config.train.num_train_steps=2",
           "--config.eval.eval_every_steps=1000", "--config.eval.num_eval_batches=1",
           "--config.eval.num_decode_batches=1", "--config.eval.final_decode_batches=1",
           "--config.eval.num_print_examples=0", "--config.data.max_input_length=32",
           "--config.data.max_target_length=32", "--config.eval.eval_batch_size=16")
  # Greedy; at most the source's length (EOS included) + decode_extra_length tokens, the
  # last of them EOS: without an EOS, that limit - 1 tokens of text.
  decoded = run_main(workdir, "--mode=decode", "--config.decode.beam_size=1",
                     "--config.data.max_eval_length=16", "--config.decode.decode_extra_length=8",
                     stdin="Ein Mann sitzt.\n", stdout_only=True)
  assert "exported step 2" in run_main(workdir, "--mode=export", f"--output={out}")
  hf = transformers.MarianMTModel.from_pretrained(out).eval()
  tokenizer = transformers.MarianTokenizer.from_pretrained(out)
  source = tokenizer(["Ein Mann sitzt."], return_tensors="pt")
  with torch.no_grad():
    ids = hf.generate(**source, num_beams=1, do_sample=False,
                      max_new_tokens=source["input_ids"].shape[1] + 8 - 1,
                      bad_words_ids=[[hf.config.pad_token_id]])
  # The exported model translates as the fine-tuned one does in decode mode.
  expected = tokenizer.decode(ids[0], skip_special_tokens=True)
  assert decoded == expected + "\n", (decoded, expected)


def test_an_original_id_without_a_row_becomes_the_unknown_id():
  class Fixed(tokenizer_files.PretrainedTokenizer):
    def _encode_original(self, text):
      return [0, 4, 9, 999]  # 9 is the map's NEW-less tail, 999 past every row

    def _decode_original(self, ids):
      return " ".join(map(str, ids))
  vocab = pretrained.VocabularyMap.build(10, pad=None, eos=9, unk=None)  # GPT-2 style
  ours = Fixed(vocab, "folder").encode("anything")
  assert ours.tolist() == [3, 7, 1, 2]  # 0 -> 3, 4 -> 7, EOS 9 -> 1, 999 -> unknown (2)
  assert Fixed(vocab, "folder").decode(ours) == "0 4"  # up to EOS
