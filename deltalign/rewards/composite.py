"""A weighted sum of reward sources for PPO and evaluation: a learned reward model plus rule-based checkers.

    reward = CompositeReward(rm, rm_weight=1.0, rules={"checker": 1.0, "mypkg.rewards:brevity": 0.5})
    total, parts = reward(prompts, responses)   # total [N]; parts: {"rm": [N], "checker": [N], ...}

Sources:

* the reward model (:class:`deltalign.rewards.model.RewardModel`), scored and normalised with the statistics the
  ``rm`` stage saved (``(score - mean) / std``), so its weight means the same thing whatever the RM's scale;
* ``checker``: the embedded task's deterministic checker (1 if the response satisfies the prompt's constraint);
* ``module:function``: a user function ``f(prompts: list, responses: list[str]) -> list[float]`` (one float per
  response), imported by name. ``prompts`` are strings or message lists, as the data gave them.

``parts`` holds each source's UNWEIGHTED values, so each can be logged on its own.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

import torch

from deltalign.rewards import checker

RuleFn = Callable[[list, list[str]], list[float]]
BUILTIN: dict[str, RuleFn] = {"checker": checker.score_batch}


def rule_function(spec: str) -> RuleFn:
    """``checker`` or ``package.module:function``; a clear error if it cannot be found or called."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise ValueError(f"unknown reward {spec!r}: use one of {sorted(BUILTIN)} or 'package.module:function'")
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward function {spec!r} cannot be imported: {e}") from e
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable")
    return fn


class CompositeReward:
    def __init__(self, reward_model=None, rm_weight: float = 0.0, rules: dict[str, float] | None = None):
        if rm_weight and reward_model is None:
            raise ValueError("rm_weight > 0 but no reward model was given")
        self.reward_model, self.rm_weight = reward_model, float(rm_weight)
        self.rules = {name: (float(w), rule_function(name)) for name, w in (rules or {}).items() if w}
        if not self.rm_weight and not self.rules:
            raise ValueError("no reward source: give a reward model weight or at least one rule")

    def __call__(self, prompts: list, responses: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(responses))
        if self.rm_weight:
            parts["rm"] = self.reward_model.normalised(self.reward_model.score(prompts, responses))
            total += self.rm_weight * parts["rm"]
        for name, (weight, fn) in self.rules.items():
            values = list(fn(prompts, responses))
            if len(values) != len(responses):
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(responses)} responses")
            bad = [v for v in values if not isinstance(v, (int, float)) or not math.isfinite(v)]
            if bad:
                raise ValueError(f"reward {name!r} returned a non-finite or non-numeric value: {bad[0]!r}")
            parts[name] = torch.tensor(values, dtype=torch.float32)
            total += weight * parts[name]
        return total, parts
