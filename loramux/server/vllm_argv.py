"""vLLM's command-line dialect, turned into plain flags before argparse reads `serve`'s.

Boundary: a list of arguments in, a list out; reads the `--config` YAML file, builds nothing.
What `vllm serve` accepts and plain argparse does not:
- `--config FILE.yaml`: a mapping of flag names (without the dashes) to values. Its flags go
  before the command line's (after a positional model), so a flag given on both wins from the
  command line. `true` is the bare switch; `false` is `--no-NAME` where that exists, else left
  out; a list is the flag's values (a repeatable flag, once per item); a mapping, or a list for a
  flag that takes one JSON value, is that JSON.
- flag names written with underscores (`--max_model_len 4096`, `--max_model_len=4096`);
- `-O3` (also `-O 3`, `-O=3`): `--optimization-level 3`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def expand_serve_argv(argv: list[str], actions: dict[str, argparse.Action]) -> list[str]:
    """`argv` (what follows `serve`) with underscores in flag names made dashes and the
    `--config` file's flags put in; `actions` is the parser's flag -> action (to spell booleans
    and lists, and to refuse a key that is no flag). ValueError names a bad file or key."""
    argv = [_dashed(a) for a in argv]
    argv = _optimization_level(argv)
    at = [i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")]
    if not at:
        return argv
    if len(at) > 1:
        raise ValueError("--config is given twice; give one config file")
    i = at[0]
    if argv[i] == "--config":
        if i + 1 >= len(argv):
            raise ValueError("--config needs a file: --config FILE.yaml")
        path, rest = argv[i + 1], argv[:i] + argv[i + 2 :]
    else:
        path, rest = argv[i].removeprefix("--config="), argv[:i] + argv[i + 1 :]
    from_file = config_file_args(path, actions)
    head = 1 if rest and not rest[0].startswith("-") else 0  # a positional model stays first
    return rest[:head] + from_file + rest[head:]


def _optimization_level(argv: list[str]) -> list[str]:
    """vLLM's -O3, -O=3 and -O 3: --optimization-level 3."""
    out: list[str] = []
    for a in argv:
        if a == "-O":
            out.append("--optimization-level")
        elif a.startswith("-O"):
            out += ["--optimization-level", a[2:].removeprefix("=")]
        else:
            out.append(a)
    return out


def _dashed(arg: str) -> str:
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return name.replace("_", "-") + eq + value


def config_file_args(path: str, actions: dict[str, argparse.Action]) -> list[str]:
    """The flags a vLLM-style YAML config file stands for, in its order."""
    import yaml

    if not path.endswith((".yaml", ".yml")):
        raise ValueError(f"--config {path}: give a YAML file (.yaml or .yml), as vLLM takes")
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML ({e})") from None
    if config is None:
        return []
    if not isinstance(config, dict):
        raise ValueError(f"--config {path}: the file must hold a mapping of flag names to values")
    out: list[str] = []
    for key, value in config.items():
        flag = "--" + str(key).replace("_", "-")
        action = actions.get(flag)
        if action is None:
            raise ValueError(
                f"--config {path}: {key!r} is not a flag of `loramux serve` (see loramux serve --help)"
            )
        out += _flag_args(flag, value, action, actions)
    return out


def _flag_args(
    flag: str, value: Any, action: argparse.Action, actions: dict[str, argparse.Action]
) -> list[str]:
    if isinstance(value, bool) and action.nargs == 0:  # a switch
        if value:
            return [flag]
        no = "--no-" + flag.removeprefix("--")
        return [no] if no in actions else []
    if value is None:
        return []
    if isinstance(value, list) and action.nargs in ("+", "*"):
        return [flag, *(_text(v) for v in value)] if value else []
    if isinstance(value, list) and isinstance(action, argparse._AppendAction):  # a repeatable flag
        return [a for v in value for a in (flag, _text(v))]
    return [flag, _text(value)]


def _text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
