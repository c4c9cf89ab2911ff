"""A trained reward model as a frozen delta on a shared backbone: adapter ``rm`` + scalar head ``rm``.

The score of a response is the head's value at the LAST NON-PAD token of ``prompt + response`` (found from the
attention mask), with the text rendered exactly as the ``rm`` stage trained on it (chat template for message-list
prompts, ``prompt + response + eos`` for plain-string prompts). PPO loads it onto the backbone it already holds:

    rm = RewardModel.load(backbone, runs/<name>/rm)      # adapter and head frozen; the active adapter is kept
    scores = rm.score(prompts, responses)                # raw scores [N]
    rewards = rm.normalised(scores)                      # (score - mean) / std of the training responses
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from deltalign.core import verify
from deltalign.model.backbone import Backbone, ModelConfig
from deltalign.model.modes import eval_mode
from deltalign.data.batching import length_grouped_batches, pad_batch
from deltalign.data.sharing import prefix_tree
from deltalign.data.formats import PrefExample
from deltalign.data.tokenize import tokenize_pair

HEAD_FILE = "head.safetensors"
STATS_FILE = "reward_stats.json"


def last_token_values(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``values`` [B, T] at each row's last attended position (the last 1 in ``attention_mask``): shape [B]."""
    pos = torch.arange(values.shape[1], device=values.device)
    last = (attention_mask.to(pos.dtype) * pos).argmax(dim=1)
    return values.gather(1, last.unsqueeze(1)).squeeze(1)


class RewardModel:
    """Adapter ``name`` + head ``name`` on ``backbone``, with the training-response statistics (or None)."""

    def __init__(self, backbone: Backbone, name: str = "rm", stats: dict | None = None,
                 max_length: int | None = None, batch_size: int = 16):
        self.backbone, self.name, self.stats = backbone, name, stats
        self.max_length = max_length  # None: score whole sequences; else cut responses as training did
        self.batch_size = batch_size
        self.share_prefixes = False  # score batches packed with shared prefixes (deltalign.data.sharing); a stage sets it

    @classmethod
    def load(cls, backbone: Backbone, run_dir: str | Path, name: str = "rm", **kwargs) -> "RewardModel":
        """Load the adapter and head of an ``rm`` run folder FROZEN onto an existing backbone (shared with PPO)."""
        run_dir = Path(run_dir)
        checks = ((run_dir / HEAD_FILE, verify.safetensors_problem), (run_dir / STATS_FILE, verify.json_problem))
        for f, problem in checks:  # both before any weights load (the stats are optional)
            if (f.exists() or f.name == HEAD_FILE) and (why := problem(f)):
                raise verify.damaged(f, why)
        previous = backbone.active
        backbone.load_adapter(name, run_dir, trainable=False)
        if previous is not None:  # loading activates the new adapter: give the caller's back
            backbone.activate(previous)
        head = backbone.load_head(name, run_dir / HEAD_FILE, trainable=False)
        head.to(next(backbone.causal_lm.parameters()).device)
        stats_file = run_dir / STATS_FILE
        stats = verify.read_json(stats_file) if stats_file.exists() else None
        if stats is not None and not all(isinstance(stats.get(k), (int, float)) for k in ("mean", "std")):
            raise verify.damaged(stats_file, "no numeric mean and std")
        return cls(backbone, name, stats, **kwargs)

    @property
    def device(self):
        return next(self.backbone.heads[self.name].parameters()).device

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw scores [B] of already tokenised ``prompt + response`` rows (any padding side; right-padded rows
        run packed when ``share_prefixes`` is on)."""
        bb = self.backbone
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        right = bool(attention_mask[:, 0].all())
        kw = {"shared": prefix_tree(input_ids, attention_mask)} if self.share_prefixes and right else {}
        # no adapter dropout: a score is a deterministic function of the text; each module's mode comes back
        with eval_mode(bb), bb.using(self.name):
            values = bb(input_ids, attention_mask, head=self.name, **kw)
        return last_token_values(values, attention_mask.to(values.device)).float()

    def tokenize(self, prompt: list[dict] | str, response: str) -> list[int]:
        """Ids of ``prompt + response`` as training rendered them (a list prompt is a chat, a string is plain)."""
        conversational = isinstance(prompt, list)
        # tokenize_pair renders and tokenises a (prompt, response) exactly like training; one side is enough
        ex = PrefExample(prompt, response, response, conversational)
        max_length = self.max_length or (1 << 62)
        item = tokenize_pair(ex, self.backbone.tokenizer, max_length, "completion", "reward model input")
        return item["prompt_ids"] + item["chosen_ids"]

    def score(self, prompts: list, responses: list[str]) -> torch.Tensor:
        """Raw scores [N] (float32, on CPU) of ``responses[i]`` to ``prompts[i]``, in the order given."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        seqs = [self.tokenize(p, r) for p, r in zip(prompts, responses)]
        out = torch.zeros(len(seqs))
        pad = self.backbone.tokenizer.pad_token_id
        for idx in length_grouped_batches([len(s) for s in seqs], self.batch_size, 0, 0, shuffle=False):
            b = pad_batch([seqs[i] for i in idx], pad)
            out[torch.tensor(idx)] = self.score_ids(b["input_ids"], b["attention_mask"]).cpu()
        return out

    def mean_std(self) -> tuple[float, float]:
        """Mean and std of the training responses' scores saved by the ``rm`` stage (a degenerate std counts as 1)."""
        if not self.stats:
            raise ValueError(f"reward model {self.name!r} has no {STATS_FILE}: cannot normalise")
        std = self.stats["std"] if math.isfinite(self.stats["std"]) and self.stats["std"] > 0 else 1.0
        return self.stats["mean"], std

    def normalised(self, scores: torch.Tensor) -> torch.Tensor:
        """``(scores - mean) / std`` with the statistics of the training responses saved by the ``rm`` stage."""
        mean, std = self.mean_std()
        return (scores - mean) / std


def load_reward_model(model_cfg: ModelConfig, run_dir: str | Path, **kwargs) -> RewardModel:
    """A reward model on a backbone of its own (for evaluation; PPO shares its backbone via RewardModel.load)."""
    return RewardModel.load(Backbone.load(model_cfg), run_dir, **kwargs)
