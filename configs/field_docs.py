"""Every config field with its one-line comment, grouped, read from configs/default.py's
source: the comments there are the only copy (`python main.py --help_config` prints them).

    for field in field_docs.fields(): print(field.path, field.comment)
"""

import ast
import inspect
import io
import os
import textwrap
import tokenize
from typing import Dict, List, NamedTuple, Tuple

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")


class Field(NamedTuple):
  group: str  # "model"; "" for the top-level fields (task, size, accel, seed)
  name: str  # "d_model"
  comment: str  # "model width"

  @property
  def path(self) -> str:
    return f"{self.group}.{self.name}" if self.group else self.name


def _comments(source: str) -> Dict[int, str]:
  """{line number: the text of the comment on it} for every comment of `source`."""
  out = {}
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      out[token.start[0]] = token.string.lstrip("#").strip()
  return out


def _assigned_field(statement) -> str:
  """"X" of a statement `name.X = ...` (a field set on a ConfigDict), else ""."""
  if (isinstance(statement, ast.Assign) and len(statement.targets) == 1
      and isinstance(statement.targets[0], ast.Attribute)
      and isinstance(statement.targets[0].value, ast.Name)):
    return statement.targets[0].attr
  return ""


def _comment_of(statement, comments: Dict[int, str]) -> str:
  """The comment on the statement's lines (the first, for one spread over several)."""
  for line in range(statement.lineno, statement.end_lineno + 1):
    if line in comments:
      return comments[line]
  return ""


def read(path: str = SOURCE) -> Tuple[Dict[str, str], List[Field]]:
  """({group: its function's docstring, first paragraph, on one line}, [Field]) in the
  order of the source. get_config sets the top-level fields (`c.seed = 0  # ...`) and
  each group from a function (`c.model = _model()`), which sets that group's fields."""
  with open(path, encoding="utf-8") as f:
    source = f.read()
  tree = ast.parse(source)
  comments = _comments(source)
  functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
  groups, fields = {}, []
  for statement in functions["get_config"].body:
    name = _assigned_field(statement)
    if not name:
      continue
    call = statement.value
    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
        and call.func.id in functions):
      function = functions[call.func.id]
      doc = inspect.cleandoc(ast.get_docstring(function) or "").split("\n\n")[0]
      groups[name] = " ".join(doc.split())
      fields += [Field(name, field, _comment_of(inner, comments))
                 for inner in function.body if (field := _assigned_field(inner))]
    else:
      fields.append(Field("", name, _comment_of(statement, comments)))
  return groups, fields


def fields(path: str = SOURCE) -> List[Field]:
  return read(path)[1]


def help_text(config, width: int = 100) -> str:
  """Every field of configs/default.py, grouped, as `group.field = <value in config>` and
  its comment; `config`: the defaults to show (default.get_config())."""
  groups, all_fields = read()
  lines = textwrap.wrap("Every config field, overridden with --config.<group>.<field>=<value>"
                        " (values: configs/default.py's defaults, task=translation; "
                        "docs/configs.md explains more).", width)
  for group in [""] + list(groups):
    members = [f for f in all_fields if f.group == group]
    shown = [(f"{f.path} = {_value(config, f)!r}", f.comment) for f in members]
    column = min(max(len(left) for left, _ in shown), 40) + 2  # a long value pushes its own
    lines.append("")
    title = groups.get(group, "config: the task, the presets applied and the seed")
    if not title.startswith("config"):
      title = f"config.{group}: {title}"
    lines += textwrap.wrap(title, width, subsequent_indent="    ")
    for left, comment in shown:
      lines.append(f"  {left:<{column - 2}}  {comment}".rstrip())
  return "\n".join(lines)


def _value(config, field: Field):
  try:
    return config[field.group][field.name] if field.group else config[field.name]
  except (KeyError, AttributeError):
    return None
