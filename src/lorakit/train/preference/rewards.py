"""GRPO's reward functions: loaded from `--reward SPEC`, called as TRL calls its reward functions.

A reward function is `f(prompts, completions, **row_fields) -> list[float]`: `prompts` and `completions` are
lists of equal length (a prompt repeated for each of its completions); for "prompt" rows both are strings, for
"messages" rows the prompt is the conversation and each completion is `[{"role": "assistant", "content": str}]`
(TRL's conversational format); `row_fields` holds every other field of the rows ("answer", ...), one list per
field aligned with the completions. It returns one finite score per completion.

Specs (`load_rewards`):
    exact            1.0 when the completion's final answer (`extract_answer`) equals the row's "answer"
    exact:FIELD      the same against the row's FIELD
    regex:PATTERN    1.0 when the stripped completion matches PATTERN entirely (re.fullmatch, DOTALL)
    module:function  a callable imported from an importable module (e.g. mypkg.rewards:score)
    path/file.py:fn  a callable defined in a Python file
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


class RewardError(ValueError):
    """A reward spec that cannot be loaded, or a reward function that returned something unusable."""


@dataclass
class Reward:
    """A loaded reward function: `name` (the metrics' key), the spec it came from, the callable, and the row
    field it needs (None: none)."""

    name: str
    spec: str
    fn: Callable
    field: str | None = None

    def __call__(self, prompts: list, completions: list, fields: dict[str, list]) -> list[float]:
        """The scores of `completions`, checked: one finite number per completion.

        Raises:
            RewardError: naming the spec, when the function raises, returns the wrong length, or returns a
                value that is not a finite number.
        """
        try:
            out = self.fn(prompts=prompts, completions=completions, **fields)
        except Exception as err:
            raise RewardError(
                f"--reward {self.spec}: the function raised {type(err).__name__}: {err}"
            ) from err
        try:
            values = [float(v) for v in out]
        except (TypeError, ValueError) as err:
            raise RewardError(
                f"--reward {self.spec}: returned {_short(out)}; expected a list of {len(completions)} numbers"
            ) from err
        if len(values) != len(completions):
            raise RewardError(
                f"--reward {self.spec}: returned {len(values)} scores for {len(completions)} completions; "
                "expected one per completion"
            )
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise RewardError(
                f"--reward {self.spec}: score {values[bad]} for completion {bad} ({_short(completions[bad])}); "
                "expected finite numbers"
            )
        return values


def load_rewards(specs: list[str]) -> list[Reward]:
    """The reward functions `specs` name (see the module docstring), with distinct metric names.

    Raises:
        RewardError: naming the spec: an empty or malformed spec, a module or file that cannot be imported, a
            missing attribute, something not callable, or an invalid regex.
    """
    if not specs:
        raise RewardError("no --reward given; expected at least one (exact, regex:PATTERN, module:function)")
    out: list[Reward] = []
    for spec in specs:
        reward = _load(spec)
        names = {r.name for r in out}
        base, k = reward.name, 2
        while reward.name in names:  # two regexes, or one function given twice: regex, regex_2, ...
            reward.name, k = f"{base}_{k}", k + 1
        out.append(reward)
    return out


def _load(spec: str) -> Reward:
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"--reward {spec!r}: expected exact, exact:FIELD, regex:PATTERN or module:function")
    if spec == "exact" or spec.startswith("exact:"):
        name = spec.partition(":")[2] or "answer"
        return Reward("exact", spec, exact_reward(name), name)
    if spec.startswith("regex:"):
        pattern = spec[len("regex:") :]
        try:
            compiled = re.compile(pattern, re.DOTALL)
        except re.error as err:
            raise RewardError(f"--reward {spec}: invalid regular expression: {err}") from err
        return Reward("regex", spec, regex_reward(compiled))
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise RewardError(
            f"--reward {spec}: not a built-in (exact, exact:FIELD, regex:PATTERN); expected module:function "
            "or path/to/file.py:function"
        )
    module = (
        _import_file(spec, where) if where.endswith(".py") or "/" in where else _import_module(spec, where)
    )
    fn = getattr(module, attr, None)
    if fn is None:
        raise RewardError(f"--reward {spec}: {where} has no attribute {attr!r}")
    if not callable(fn):
        raise RewardError(f"--reward {spec}: {where}.{attr} is a {type(fn).__name__}, not callable")
    return Reward(attr, spec, fn)


def _import_module(spec: str, name: str):
    try:
        return importlib.import_module(name)
    except Exception as err:
        raise RewardError(
            f"--reward {spec}: cannot import module {name!r}: {type(err).__name__}: {err}"
        ) from err


def _import_file(spec: str, path: str):
    file = Path(path)
    if not file.is_file():
        raise RewardError(f"--reward {spec}: no such file {path}")
    loaded = importlib.util.spec_from_file_location(f"lorakit_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(loaded)
    try:
        loaded.loader.exec_module(module)
    except Exception as err:
        raise RewardError(f"--reward {spec}: importing {path} failed: {type(err).__name__}: {err}") from err
    return module


def completion_text(completion) -> str:
    """The text of a completion: a string, or TRL's conversational `[{"role": "assistant", "content": ...}]`."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def extract_answer(text: str) -> str:
    """A completion's final answer, normalized (`normalize`): the last \\boxed{...}; else what follows the
    last "####", "answer:" or "answer is" (case-insensitive): the number it starts with, or its first line;
    else the last number in the text; else the whole stripped text."""
    text = text.strip()
    boxed = _BOXED.findall(text)
    if boxed:
        return normalize(boxed[-1])
    marks = [m.end() for m in re.finditer(r"####|answer\s*(?:is|:)", text, re.IGNORECASE)]
    if marks:
        tail = text[marks[-1] :].strip().lstrip("$").strip()
        number = _NUMBER.match(tail)
        return normalize(number.group() if number else tail.split("\n", 1)[0])
    numbers = _NUMBER.findall(text)
    return normalize(numbers[-1] if numbers else text)


def normalize(answer) -> str:
    """Compare answers as text: stripped, a final period dropped, numbers without separators or ".0"."""
    s = str(answer).strip().rstrip(".").strip()
    if _NUMBER.fullmatch(s):
        s = s.replace(",", "")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
    return s


def exact_reward(field: str = "answer") -> Callable:
    """The built-in `exact`: 1.0 when `extract_answer(completion)` equals the row's `field`, normalized."""

    def exact(prompts, completions, **fields):
        if field not in fields:
            raise KeyError(f"the rows have no field {field!r} (exact match needs the reference answer)")
        refs = fields[field]
        return [float(extract_answer(completion_text(c)) == normalize(r)) for c, r in zip(completions, refs)]

    return exact


def regex_reward(pattern: re.Pattern) -> Callable:
    """The built-in `regex:PATTERN`: 1.0 when the stripped completion matches the pattern entirely."""

    def regex(prompts, completions, **fields):
        return [float(pattern.fullmatch(completion_text(c).strip()) is not None) for c in completions]

    return regex


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
