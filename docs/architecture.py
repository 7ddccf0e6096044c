"""Diagrams of the three model families, traced from the code itself.

    python docs/architecture.py                 # print the diagrams (tiny size)
    python docs/architecture.py --write         # rewrite the generated parts of docs/architecture.md
    python docs/architecture.py --check         # exit 1 if docs/architecture.md is stale
    python docs/architecture.py --variant=size=base   # another size (printing only)

Each model is built the way training builds it: `configs/default.py:task=<task>` gives the
run config, `tasks.get_task` turns it into the model (`EncoderDecoder`, `DecoderOnly`,
`Classifier`) with the task's vocabulary and lengths. The model is then initialised under
`jax.eval_shape` (shapes only, no compute) with a Flax method interceptor that records
every module call in the order it happens: the module's path in the parameter tree, its
class, the arrays it receives and returns, and its parameters. A batch dimension of 3 is
traced and written as `B`.
"""

import argparse
import dataclasses
import difflib
import inspect
import os
import re
import textwrap
import sys
from typing import Any, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import default  # noqa: E402
import tasks  # noqa: E402

DOC = os.path.join(ROOT, "docs", "architecture.md")
BATCH = 3  # traced batch size, printed as B (no other traced dimension is 3)
DTYPES = {"float32": "f32", "int32": "i32", "bool": "bool", "bfloat16": "bf16",
          "float16": "f16"}
# The generated sections: name -> (config variant, overrides of config fields by dotted
# name, what to draw).
SECTIONS = {
    "translation": ("task=translation", {}, "model"),
    "generation": ("task=generation", {}, "model"),
    "generation_cache": ("task=generation", {}, "cache"),
    "classification": ("task=classification", {}, "model"),
    "pre_norm": ("task=classification", {"model.norm_placement": "pre"}, "encoder"),
}


@dataclasses.dataclass
class Call:
  """One method call of one module, with the calls it made."""

  path: Tuple[str, ...]
  cls: str
  method: str
  module: Any
  inputs: List[Tuple[str, Any]]
  output: List[Any] = dataclasses.field(default_factory=list)
  children: List["Call"] = dataclasses.field(default_factory=list)


def _arrays(tree) -> List[Any]:
  return [x for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape")]


def _shape(x, batch: bool = True) -> str:
  dims = [str(d) for d in x.shape]
  if batch and dims and x.shape[0] == BATCH:
    dims[0] = "B"
  return f"{DTYPES.get(str(x.dtype), str(x.dtype))}[{','.join(dims)}]"


def build(variant: str, overrides: Optional[dict] = None, decode: bool = False):
  """The run config, the task, its model and the keyword inputs of one dummy batch."""
  config = default.get_config(variant)
  for field, value in (overrides or {}).items():
    group, name = field.split(".")
    config[group][name] = value
  task = tasks.get_task(config, None, training=False)
  model = task.build_model(decode=decode)
  batch = {k: jnp.ones((BATCH, n), jnp.int32) for k, n in task.lengths.items()}
  return config, task, model, task.model_inputs(batch)


def trace(model, inputs: dict):
  """Records every module method call of `model.init(**inputs)`; returns (root, variables)."""
  root = Call((), type(model).__name__, "__call__", model,
              [(k, v) for k, v in inputs.items()])
  stack = [root]

  def interceptor(next_fun, args, kwargs, context):
    name = context.method_name
    if name == "setup" or (name.startswith("_") and name != "__call__"):
      return next_fun(*args, **kwargs)
    module = context.module
    bound = inspect.signature(context.orig_method).bind(*args, **kwargs)
    named = [(name, value) for name, value in bound.arguments.items()
             if hasattr(value, "shape")]
    is_root = module.scope is not None and module.path == () and context.method_name == "__call__"
    call = root if is_root and not root.children else Call(
        tuple(module.path), type(module).__name__, context.method_name, module, named)
    if call is not root:
      stack[-1].children.append(call)
    stack.append(call)
    try:
      out = next_fun(*args, **kwargs)
    finally:
      stack.pop()
    call.output = _arrays(out)
    return out

  def init():
    with nn.intercept_methods(interceptor):
      # mutable=True: also the intermediates collection (sown attention weights).
      return model.init(jax.random.PRNGKey(0), **inputs, mutable=True)

  variables = jax.eval_shape(init)
  return root, variables


def _subtree(tree: dict, path: Tuple[str, ...]) -> dict:
  for name in path:
    tree = tree.get(name, {}) if isinstance(tree, dict) else {}
  return tree if isinstance(tree, dict) else {}


def _note(call: Call, variables: dict, seen: set) -> str:
  """Parameters owned directly by the module (first call only) and a few settings."""
  m = call.module
  if call.cls == "Dropout":
    return f"rate {m.rate}"
  if call.cls == "PositionalEncoding" and m.kind == "sinusoidal":
    return "sinusoidal, no parameters"
  if call.cls == "MultiHeadAttention":
    note = f"{m.num_heads} heads x head_dim {m.head_dim}"
  else:
    note = ""
  params = {k: v for k, v in _subtree(variables["params"], call.path).items()
            if hasattr(v, "shape")}
  if params:
    if call.path in seen:
      text = "(parameters above)"
    else:
      text = ", ".join(f"{k} {list(v.shape)}" for k, v in params.items())
    note = f"{note}; {text}" if note else text
  seen.add(call.path)
  return note


def _label(call: Call, parent: Optional[Call]) -> str:
  if parent is None:
    return f"{'/'.join(call.path)}  {call.cls}" if call.path else call.cls
  if call.path == parent.path:
    return f".{call.method}"  # another method of the same module (encode, decode)
  if call.path[:len(parent.path)] == parent.path:
    name = call.path[-1]
  else:
    name = "/" + "/".join(call.path)  # a module owned elsewhere (a shared embedding)
  name = name if call.method == "__call__" else f"{name}.{call.method}"
  return f"{name}  {call.cls}"


def _io(call: Call) -> Tuple[str, str]:
  """("-> outputs", the inputs worth showing): the first input is left out when it has
  the output's shape and dtype (the residual stream passing through)."""
  outs = ", ".join(_shape(v) for v in call.output)
  inputs = list(call.inputs)
  if inputs and call.output and (inputs[0][1].shape, inputs[0][1].dtype) == (
      call.output[0].shape, call.output[0].dtype):
    inputs = inputs[1:]
  return f"-> {outs}", ", ".join(f"{n} {_shape(v)}" for n, v in inputs)


def _join(*notes: str) -> str:
  return "; ".join(n for n in notes if n)


def _rows(call: Call, parent: Optional[Call], variables: dict, seen: set, prefix: str = "",
          last: bool = True, top: bool = True) -> List[Tuple[str, str, str]]:
  """(tree + label, -> outputs, inputs and parameters) rows of `call` and its descendants."""
  branch = "" if top else ("└─ " if last else "├─ ")
  out, ins = _io(call)
  rows = [(prefix + branch + _label(call, parent), out, _join(ins, _note(call, variables, seen)))]
  child_prefix = prefix + ("" if top else ("   " if last else "│  "))
  entries = []  # (kind, payload): calls, runs of repeated blocks, then sown values
  children = call.children
  i = 0
  while i < len(children):
    j = i + 1
    while j < len(children) and _same(children[j], children[i]):
      j += 1
    entries.append(("call", children[i]))
    if j > i + 1:
      entries.append(("repeat", (children[i + 1], children[j - 1], children[i])))
    i = j
  if call.method == "__call__":
    sown = _subtree(variables.get("intermediates", {}), call.path)
    for name, values in sown.items():
      if not isinstance(values, dict):
        entries.append(("sown", (name, values)))
  for n, (kind, payload) in enumerate(entries):
    is_last = n == len(entries) - 1
    if kind == "call":
      rows += _rows(payload, call, variables, seen, child_prefix, is_last, top=False)
    elif kind == "repeat":
      first, final, model = payload
      names = first.path[-1] if first is final else f"{first.path[-1]} ... {final.path[-1]}"
      out, ins = _io(first)
      rows.append((child_prefix + ("└─ " if is_last else "├─ ") + f"{names}  {first.cls}",
                   out, _join(ins, f"as {model.path[-1]}, with own parameters")))
    else:
      name, values = payload
      rows.append((child_prefix + ("└─ " if is_last else "├─ ") + f"{name} (sown)",
                   "-> " + ", ".join(_shape(v) for v in values),
                   "intermediates collection"))
  return rows


def _signature(call: Call, depth: int = 0):
  """What a call looks like, ignoring its own name: equal for identically shaped blocks."""
  return (call.cls, call.method, tuple(call.path[-1:]) if depth else (),
          tuple((n, v.shape, str(v.dtype)) for n, v in call.inputs),
          tuple((v.shape, str(v.dtype)) for v in call.output),
          tuple(_signature(c, depth + 1) for c in call.children))


def _same(a: Call, b: Call) -> bool:
  return (a.cls == b.cls and a.path and b.path and a.path[:-1] == b.path[:-1] and
          re.sub(r"\d+$", "", a.path[-1]) == re.sub(r"\d+$", "", b.path[-1]) and
          a.path != b.path and _signature(a) == _signature(b))


def _table(rows) -> str:
  w1 = max(len(r[0]) for r in rows)
  w2 = max(len(r[1]) for r in rows)
  return "\n".join(f"{a:<{w1}}  {b:<{w2}}  {c}".rstrip() for a, b, c in rows)


def _count(tree) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "size"))


def _find(call: Call, path: Tuple[str, ...]) -> Call:
  if call.path == path and call.method == "__call__":
    return call
  for c in call.children:
    found = _find_or_none(c, path)
    if found is not None:
      return found
  raise KeyError(path)


def _find_or_none(call: Call, path):
  try:
    return _find(call, path)
  except KeyError:
    return None


def _summary(config, model) -> str:
  cfg = model.config
  layers = {"EncoderDecoder": f"{cfg.num_encoder_layers} encoder + {cfg.num_decoder_layers} "
                              f"decoder layers",
            "DecoderOnly": f"{cfg.num_decoder_layers} decoder layers",
            "Classifier": f"{cfg.num_encoder_layers} encoder layers"}[type(model).__name__]
  parts = [f"d_model {cfg.d_model}", f"{cfg.num_heads} heads x head_dim {cfg.head_dim}",
           f"d_ff {cfg.d_ff}", layers, f"vocab {cfg.vocab_size}"]
  if type(model).__name__ == "EncoderDecoder":
    parts.append(f"target vocab {cfg.target_vocab_size}")
    parts.append(f"share_embeddings={cfg.share_embeddings}")
  if type(model).__name__ != "Classifier":
    parts.append(f"tie_output={cfg.tie_output}")
  else:
    parts += [f"{cfg.num_classes} classes", f"pooling={cfg.pooling}"]
  parts += [f"norm_placement={cfg.norm_placement}",
            f"positional_encoding={cfg.positional_encoding}", f"max_length {cfg.max_length}"]
  return ", ".join(parts)


def render(name: str, size: str = "tiny") -> str:
  """The text of one generated section."""
  variant, overrides, what = SECTIONS[name]
  variant = f"{variant},size={size}"
  flags = "".join(f" --config.{k}={v}" for k, v in overrides.items())
  decode = what == "cache"
  config, _, model, inputs = build(variant, overrides, decode=decode)
  root, variables = trace(model, inputs)
  head = [f"# configs/default.py:{variant}{flags}"]
  head += ["# " + line for line in textwrap.wrap(
      f"{type(model).__name__}: {_summary(config, model)}", 94)]
  if what == "cache":
    cache = variables["cache"]
    leaves = jax.tree_util.tree_leaves_with_path(cache)
    rows = [("/".join(p.key for p in path), _shape(leaf)) for path, leaf in leaves]
    w = max(len(r[0]) for r in rows)
    body = "\n".join(f"{a:<{w}}  {b}" for a, b in rows)
    head.append("# the 'cache' collection of model.init with decode=True (a full-length "
                "dummy input sets its size)")
    return "\n".join(head + [body])
  if what == "encoder":
    call = _find(root, ("encoder",))
    body = _table(_rows(call, None, variables, set()))
    return "\n".join(head + [body])
  head.append(f"# {_count(variables['params']):,} parameters")
  return "\n".join(head + [_table(_rows(root, None, variables, set()))])


def begin_marker(name: str) -> str:
  return f"<!-- BEGIN GENERATED {name}: python docs/architecture.py --write -->"


def end_marker(name: str) -> str:
  return f"<!-- END GENERATED {name} -->"


def updated_doc(text: str, size: str = "tiny") -> str:
  """`text` (docs/architecture.md) with every generated section rendered afresh."""
  for name in SECTIONS:
    begin, end = begin_marker(name), end_marker(name)
    if text.count(begin) != 1 or text.count(end) != 1:
      raise ValueError(f"docs/architecture.md needs exactly one {begin!r} and one {end!r}")
    start = text.index(begin) + len(begin)
    stop = text.index(end)
    text = text[:start] + "\n```\n" + render(name, size) + "\n```\n" + text[stop:]
  return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--write", action="store_true", help="rewrite docs/architecture.md")
  parser.add_argument("--check", action="store_true",
                      help="exit 1 if docs/architecture.md differs from the code")
  parser.add_argument("--variant", default="size=tiny",
                      help="size=... for printing (the document uses size=tiny)")
  args = parser.parse_args(argv)
  size = dict(item.split("=", 1) for item in args.variant.split(",") if item).get("size", "tiny")
  if args.write or args.check:
    if size != "tiny":
      parser.error("the document is generated with size=tiny")
    with open(DOC) as f:
      current = f.read()
    fresh = updated_doc(current)
    if args.check:
      if fresh != current:
        sys.stdout.writelines(difflib.unified_diff(
            current.splitlines(True), fresh.splitlines(True), "docs/architecture.md",
            "generated"))
        print("docs/architecture.md is stale: run python docs/architecture.py --write")
        return 1
      print("docs/architecture.md matches the code")
      return 0
    with open(DOC, "w") as f:
      f.write(fresh)
    print(f"wrote {DOC}")
    return 0
  for name in SECTIONS:
    print(f"== {name}\n{render(name, size)}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
