"""Every user-facing setting, declared once: its type, its range and what it means.

A settings class is a dataclass deriving from `Settings`; each field's rule sits beside it
(`option(5000, at_least(1))`), and the class checks itself when built, so no caller has to remember to:

    AgentConfig(chunk_tokens=0)     -> SettingError: 'agent.chunk_tokens' must be >= 1, got 0

One reader builds them from every source, always by name: command-line flags (`--k v`, `--k=v`,
dots for sections), JSON files (`--config FILE`), a checkpoint's agent.json, a resumed run's saved
settings. Unknown keys are refused with the nearest valid name. Rules that tie fields together live
in one method per class, `check_together`. `read_json` is the one way a JSON file enters.

This file holds the machinery and the training run's sections; the tree's root is train.Config,
`AgentConfig` lives in memory_agent.py and `SamplingParams` in rollout.py, all on this machinery.
"""
import dataclasses
import decimal
import difflib
import inspect
import json
import math
import re
import sys
import types
import typing
from dataclasses import dataclass


class SettingError(ValueError):
    """A setting, a settings file or a flag is wrong; the message names it."""


# a rule is (test, what a value must be)
def at_least(lo):
    return lambda v: v >= lo, f">= {lo}"


def above(lo):
    return lambda v: v > lo, f"> {lo}"


def within(lo, hi, low_open=False, high_open=False):
    text = f"in {'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
    return lambda v: (lo < v if low_open else lo <= v) and (v < hi if high_open else v <= hi), text


def one_of(*choices):
    return lambda v: v in choices, "one of " + ", ".join(map(str, choices))


# below these, fp32 sampling underflows (every probability 0): refused rather than sampled as NaN
TEMPERATURE = (lambda v: v == 0 or v >= 1e-6, "0 (greedy) or >= 1e-6")
TOP_P = within(1e-6, 1)


def option(default, check=None, **kw):
    """A field with its rule (`check`, from the helpers above); mutable defaults go via default_factory."""
    if dataclasses.is_dataclass(default) or isinstance(default, type):
        factory = default if isinstance(default, type) else type(default)
        return dataclasses.field(default_factory=factory, metadata=dict(check=check), **kw)
    return dataclasses.field(default=default, metadata=dict(check=check), **kw)


INT64 = 2**63 - 1


def _convert(kind, value):
    """`value` as `kind` (bool, int, float, str, tuple of ints, or X | None), from JSON or flag text;
    never truncates, never accepts NaN or inf. Raises TypeError/ValueError."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
    elif kind is int and not isinstance(value, bool):
        if isinstance(value, str):
            value = _number(value)
        if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value == int(value)):
            return int(value)
    elif kind is float and not isinstance(value, bool):
        number = float(value) if isinstance(value, (str, int, float)) else None
        if number is not None and math.isfinite(number):
            return number
    elif kind is str and isinstance(value, str):
        return value
    elif typing.get_origin(kind) is tuple and isinstance(value, (list, tuple)):
        return tuple(_convert(int, v) for v in value)
    raise ValueError(value)


def _number(text):  # exact: "1e3" is 1000, "9.007199254740993e15" is not rounded to a float first
    try:
        number = decimal.Decimal(text.strip())
    except decimal.InvalidOperation:
        raise ValueError(text) from None
    return int(number) if number.is_finite() and number == number.to_integral_value() else float(number)


class Settings:
    """Base of every settings dataclass. `section` prefixes the names in messages ("agent.")."""
    section: typing.ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, key = getattr(self, f.name), self.section + f.name
            if isinstance(value, Settings):
                continue  # built, so already checked
            try:
                value = _convert(hints[f.name], value)
            except (TypeError, ValueError, OverflowError):
                kind = getattr(hints[f.name], "__name__", str(hints[f.name]).replace("typing.", ""))
                raise SettingError(f"'{key}' expects {kind}, got {value!r}") from None
            if type(value) is int and abs(value) > INT64:
                raise SettingError(f"'{key}' must fit in 64 bits, got {str(value)[:24]}...")
            check = f.metadata.get("check")
            if value is not None and check and not check[0](value):
                raise SettingError(f"'{key}' must be {check[1]}, got {value!r}")
            object.__setattr__(self, f.name, value)  # frozen classes too
        self.check_together()

    def check_together(self):
        """Rules that tie fields together (override)."""

    @classmethod
    def below(cls, values) -> dict:
        """Settings that the file and flags `values` go over (override: a checkpoint's agent.json)."""
        return {}

    @classmethod
    def from_argv(cls, argv, doc=""):
        """`--config FILE` (dotted keys allowed), then the flags over it, over `below` -> a checked cls.
        --help prints `doc` and every setting."""
        flags, path = parse_flags(argv)
        try:
            wants_help = _convert(bool, flags.pop("help", False))
        except ValueError:
            raise SettingError(f"'help' expects bool, got {flags.get('help')!r}") from None
        if wants_help:
            print(doc.strip() + "\n\nsettings (--key=value or --key value; --config FILE holds them as JSON):")
            print("\n".join(usage(cls)))
            sys.exit(0)
        values = merge(nest(read_json(path, "a JSON object of settings"), path) if path else {}, flags)
        return build(cls, merge(cls.below(values), values), f"{path} and the command line" if path else "command line")


def usage(cls, prefix=""):
    """Each setting of cls as a flag: its default, its rule, and the comment beside its declaration."""
    notes = dict(re.findall(r"^ +(\w+):[^#\n]*# *(.+)$", "".join(inspect.getsource(c) for c in cls.__mro__
                                                                 if issubclass(c, Settings)), re.M))
    lines, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if isinstance(hints[f.name], type) and issubclass(hints[f.name], Settings):
            lines += usage(hints[f.name], prefix + f.name + ".")
            continue
        rule = f.metadata.get("check")
        lines.append(f"  --{prefix}{f.name}={f.default}" + (f"  ({rule[1]})" if rule else "")
                     + (f"  {notes[f.name]}" if f.name in notes else ""))
    return lines


def nearest(name, names, prefix=""):
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else f"; known: {', '.join(sorted(names))}"


def build(cls, values, where, prefix=""):
    """A nested dict (from JSON, flags, a saved run) -> a checked `cls`; errors name `where` and the key."""
    if not isinstance(values, dict):
        raise SettingError(f"{where}: {prefix.rstrip('.') or 'the settings'} must be a JSON object, got "
                           f"{type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints, kw = typing.get_type_hints(cls), {}
    for key, value in values.items():
        if key not in known:
            raise SettingError(f"{where}: unknown key '{prefix}{key}'{nearest(key, list(known), prefix)}")
        sub = hints[key]
        kw[key] = build(sub, value, where, prefix + key + ".") if isinstance(sub, type) and \
            issubclass(sub, Settings) else value
    try:
        return cls(**kw)
    except SettingError as e:
        raise SettingError(f"{where}: {e}") if not str(e).startswith(where) else e from None


def merge(base, update):
    """Deep merge of nested dicts: update's keys win."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def parse_flags(argv):
    """['--a.b=1', '--c', '2', '--flag', '--config', 'F'] -> ({'a': {'b': '1'}, 'c': '2', 'flag': 'true'},
    'F'). A bare flag means true; dashes in names are underscores."""
    args, values, config, seen = list(argv), {}, None, set()
    while args:
        a = args.pop(0)
        if not a.startswith("--") or a == "--":
            raise SettingError(f"argument '{a}': expected --key=value or --key value")
        key, eq, value = a[2:].partition("=")
        if not eq:  # a bare flag is True: a bool setting takes it, any other refuses it by name
            value = args.pop(0) if args and not args[0].startswith("--") else True
        key = key.replace("-", "_")
        # a later flag overrides an earlier one, as usual; but a second file, or a section given as a
        # value and as a section, would drop what came first without a word
        clash = [k for k in seen if (k == key == "config") or k.startswith(key + ".") or key.startswith(k + ".")]
        if clash:
            raise SettingError(f"argument '{a}': --{clash[0]} is already given")
        seen.add(key)
        if key == "config":
            if value is True:
                raise SettingError("argument '--config': give the settings file, --config FILE")
            config = value
        else:
            values = merge(values, nest({key: value}, f"argument '{a}'"))
    return values, config


def nest(values, where, out=None, prefix=""):
    """{'a.b': 1, 'a': {'c': 2}} -> {'a': {'b': 1, 'c': 2}}: dotted keys, as flags and files may use;
    one setting given in two spellings is refused."""
    out = {} if out is None else out
    for key, value in values.items():
        if isinstance(value, dict) and value:
            nest(value, where, out, f"{prefix}{key}.")
            continue
        *sections, leaf = (prefix + key).split(".")
        node = out
        for s in sections:
            node = node.setdefault(s, {})
            if not isinstance(node, dict):
                raise SettingError(f"{where}: '{s}' is set and used as a section")
        if leaf in node:
            raise SettingError(f"{where}: '{prefix}{key}' is given twice")
        node[leaf] = value
    return out


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:  # json keeps the last one without a word
        raise ValueError(f"key {twice!r} appears twice in one object")
    return dict(pairs)


def read_json(path, what="a JSON object", expect=dict):
    """The one way a JSON file enters: parsed, of the expected top-level type, or an error naming the file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            value = json.load(f, object_pairs_hook=_unique_keys)
    except FileNotFoundError:
        raise SettingError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SettingError(f"{path}: cannot read ({e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a 5000-digit number, [[[[... nested
        raise SettingError(f"{path}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(value, expect):
        raise SettingError(f"{path}: expected {what}, got a JSON {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------
# the training run's settings (train.py): one tree, `--section.key=value` on the command line

TASK_FILES = ("jsonl", "hotpotqa")


@dataclass
class DataConfig(Settings):
    section: typing.ClassVar[str] = "data."
    tasks: str = "niah_single"  # comma list of tasks.TASKS names, or jsonl:FILE / hotpotqa:FILE
    lengths: str = "1k"  # document lengths of synthetic questions (comma list, cycled)
    hotpot_docs: int = option(200, at_least(1))  # documents per HotpotQA question
    questions_per_step: int = option(8, at_least(1))  # over all ranks
    shuffle: bool = True  # a file's questions in a fresh seeded order each epoch, or in file order
    max_questions: int = option(0, at_least(0))  # > 0: only a file's first max_questions, cycled (release: 8192)
    max_chunks: int = option(0, at_least(0))  # > 0: longer documents keep their first and last max_chunks x
    #                                           chunk_tokens / 2 tokens (the release trains on 8 chunks)
    # SFT of a model trained from scratch (the embedded tiny agent):
    copy_warmup_steps: int = option(0, at_least(0))  # first steps train on repeated random text instead
    tokenizer_tasks: str = ""  # tasks whose text trains a from-scratch tokenizer (default TOKENIZER_TASKS)
    sft_direct: bool = False  # also teach answering from the whole document (the --mode direct baseline)


@dataclass
class RLConfig(Settings):
    section: typing.ClassVar[str] = "rl."
    n: int = option(16, at_least(1))  # rollouts per question (the group)
    mini_batches: int = option(1, at_least(1))  # optimizer steps per rollout step
    temperature: float = option(1.0, at_least(1e-6))  # RL samples its rollouts
    top_p: float = option(1.0, TOP_P)
    clip_low: float = option(0.2, within(0, 1, high_open=True))
    clip_high: float = option(0.28, at_least(0))
    clip_c: float = option(3.0, above(1))  # dual clip
    loss_agg: str = option("token-mean", one_of("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"))
    norm_by_std: bool = False  # the released MemAgent scripts use R - mean(R)
    reward: str = option("boxed_em", one_of("boxed_em", "sample"))  # the release's (tasks.boxed_em) | the sample's
    overlong_buffer: int = option(0, at_least(0))  # > 0: DAPO's soft penalty on answers near answer_tokens
    dynamic_sampling: bool = True
    max_rounds: int = option(3, at_least(1))  # generation rounds per step; then out_of_rounds decides
    out_of_rounds: str = option("train", one_of("train", "error"))  # train on what it has | error (DAPO recipe)
    filter_by: str = option("reward", one_of("reward", "accuracy"))  # what must differ in a kept group: the
    #                                                                  shaped reward | accuracy (DAPO recipe)
    shuffle_mini_batches: bool = True  # a seeded permutation of the rows, or contiguous slices in turn order
    kl_coef: float = option(0.0, at_least(0))
    kl_estimator: str = option("k3", one_of("k1", "k2", "k3"))


@dataclass
class OptimConfig(Settings):
    section: typing.ClassVar[str] = "optim."
    lr: float = option(1e-6, above(0))
    warmup_steps: int = option(20, at_least(0))
    cooldown_steps: int = option(0, at_least(0))  # the LR falls linearly to 0 over the last cooldown_steps
    weight_decay: float = option(0.01, at_least(0))
    beta1: float = option(0.9, within(0, 1, high_open=True))
    beta2: float = option(0.999, within(0, 1, high_open=True))
    grad_clip: float = option(1.0, above(0))
    micro_batch_tokens: int = option(16384, at_least(1))
    warmup_from_zero: bool = False  # warm-up LR at step s: s / warmup_steps (0 first, the release), or (s + 1) / ...
    decay_all: bool = False  # weight decay on every parameter (the release), or not on norms and biases


@dataclass
class EngineConfig(Settings):
    section: typing.ClassVar[str] = "engine."
    block_size: int = option(16, (lambda v: v >= 16 and v & (v - 1) == 0, "a power of two >= 16"))
    num_blocks: int = option(0, at_least(0))  # 0: sized from memory
    max_num_seqs: int = option(256, at_least(1))
    max_num_batched_tokens: int = option(8192, at_least(1))
    gpu_memory_utilization: float = option(0.5, within(0, 1, low_open=True))  # of the card, after training
    cuda_graphs: bool = True


@dataclass
class EvalConfig(Settings):
    """Held-out validation during training: never trained on (its own seed, or its own file)."""
    section: typing.ClassVar[str] = "eval."
    every: int = option(0, at_least(0))  # steps between validations; 0 = never
    tasks: str = ""  # default: data.tasks
    lengths: str = ""  # default: data.lengths
    samples: int = option(8, at_least(1))  # questions per task x length
    n: int = option(1, at_least(1))  # rollouts per question
    temperature: float = option(0.0, TEMPERATURE)
    top_p: float = option(1.0, TOP_P)
    seed: int = option(1_000_003, within(0, INT64))  # held-out questions are drawn with this seed

    def check_together(self):
        check_repeats(self.n, self.temperature, self.section)


def check_repeats(n, temperature, prefix=""):
    """n greedy rollouts of one question are one rollout n times: they would count as n."""
    if n > 1 and temperature == 0:
        raise SettingError(f"{prefix}n={n} at {prefix}temperature=0 repeats one greedy rollout {n} times; "
                           "use n=1, or sample (temperature > 0)")
