"""What both sides of the benchmark share: the settings, the FLOP convention, and how a child reports back.

Every measurement runs in a fresh process (``bench/ours.py``, ``bench/trl_side.py``, ``bench/naive_ppo.py``,
``bench/matmul_peak.py``); the orchestrator ``bench/run.py`` alternates them and takes medians. A child prints
exactly one line ``BENCH_RESULT {json}`` on stdout with its throughput, the time window it measured and its own
peak resident memory (``getrusage(RUSAGE_SELF).ru_maxrss``, i.e. the whole process: imports, model, training).

Throughput is measured over optimizer steps only: the first ``WARMUP_STEPS`` steps are run but not timed, and
model loading, data preparation and any evaluation after training are outside the window. Both sides time the
same thing: from the end of the warm-up step to the end of the last step.

FLOP convention (model FLOPs, written down once here and applied identically to every side)
---------------------------------------------------------------------------------------------
``N_body``: parameters of the transformer blocks (every linear weight of attention and MLP; norms are negligible
but counted), embeddings excluded. ``N_head``: the LM head, ``vocab x hidden`` (tied to the input embedding in
SmolLM2, but it is still a matmul every token passes through). The input embedding is a lookup: 0 FLOPs.

Forward FLOPs per token of a sequence of length T (Kaplan et al. 2020, PaLM appendix B):

    F(T) = 2 * N + 4 * n_layer * d_model * T          (N = N_body + N_head for LM stages, N_body for scalar heads)

the second term being attention's QK^T and AV (counted over the full T x T square, as PaLM does).

Training with a frozen base and LoRA deltas:  ``train = 2 * F``: forward (2N) plus the backward pass through
activations (2N); no weight gradients are formed for the frozen base, and the adapters' (r=16: ~0.3% of N) are
ignored. This is the "4N" convention. The usual full-fine-tuning "6N" convention would multiply every training
FLOP count (and so every share of peak) by 1.5; ratios between the two sides are unaffected either way.

Tokens are real (non-pad) tokens: padding is work the implementation chose to do, not model FLOPs.

* SFT: per sequence of T tokens: ``T * train(T)`` (LM head counted on every token, as the standard convention
  does, even where an implementation skips it for prompt tokens).
* RM:  per pair: both sequences, ``T * train(T)`` with ``N = N_body`` (a scalar head, no LM head).
* DPO: per pair: both sequences, ``T * (train(T) + F(T))``: the policy trains and the reference (the same base
  with adapters off) runs one forward.
* PPO (per sample, prompt P, response R, T = P + R, E PPO epochs):
  rollout generation ``T * F(T)`` (KV cache: each token's forward once), policy old log-probs ``T * F(T)``,
  reference ``T * F(T)``, reward model and critic values ``2 * T * F_body(T)``, then E epochs of policy training
  ``T * train(T)`` and critic training ``T * train_body(T)``. Every side is charged with this same count for the
  samples it processed, whether it actually recomputes something or caches it.
* GRPO (per sample, i.e. per response of a group; prompt P, response R, T = P + R, E passes over the rollout):
  rollout generation ``T * F(T)`` (KV cache), then E passes of policy training ``T * train(T)``; plus, only on
  the side that actually runs it, a separate no-grad forward for the old log-probs ``T * F(T)`` (ours takes them
  from the first pass's training forward when a pass is one minibatch, which gives ratio 1 by construction; TRL's
  ``GRPOTrainer`` runs the forward whenever ``gradient_accumulation_steps`` is not a multiple of
  ``steps_per_generation x num_iterations``, as with the bench's 1 vs 1 x 2); the
  reference ``T * F(T)`` only if ``beta > 0``; a learned reward model ``T * F_body(T)`` only if it scores (the
  bench rewards with the embedded checker alone: ~0 FLOPs). Unlike PPO's count, GRPO's depends on what each side
  runs, so its FLOP/s share is the share of the work that side did; samples/s is the like-for-like comparison,
  and the table's notes say which side ran the optional forwards.

Device and model (``bench/run.py --device {cpu,cuda} --model {PATH,random:SIZE}``)
---------------------------------------------------------------------------------
On ``cuda`` both sides run in bfloat16 (``Settings.dtype``), on ``cpu`` in float32. The timer synchronises CUDA
before every timestamp, a child reports ``torch.cuda.max_memory_allocated`` (``peak_gpu_mb``) next to its RSS, and
the peak the FLOP/s share (MFU) is taken of is a bf16 matmul on the GPU (``matmul_peak.py --device cuda --dtype
bf16``). ``random:SIZE`` is a randomly initialised Llama built here (:func:`build_random`), so that a machine
without the checkpoint (a lent GPU machine: no internet) can run the bench; see :func:`random_shape` for the rule.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT_TAG = "BENCH_RESULT "
WARMUP_STEPS = 1


@dataclass
class Settings:
    """The hyperparameters both sides use (one object, passed to every child as JSON)."""
    model: str = "models/SmolLM2-135M-Instruct"
    """The checkpoint directory every child loads (for ``random:SIZE``, the built one under ``bench/.cache``)."""
    model_name: str = ""
    """What ``--model`` said (``random:0.5b``), for the result files; empty = ``model``."""
    model_params: int = 0
    """Parameter count of a ``random:`` model (0: not recorded)."""
    workload: str = "embedded"
    """Which of :data:`WORKLOADS` (data, model): names the result files and the plans (bench/plan.py)."""
    """Parameter count of a ``random:`` model (0: not recorded)."""
    device: str = "cpu"
    """``cpu`` or ``cuda``: where every child runs (ours: accelerate picks the GPU when there is one)."""
    dtype: str = "float32"
    """float32 on cpu, bfloat16 on cuda (both sides)."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str = "all-linear"
    batch_size: int = 8
    """Rows (SFT) or pairs (RM, DPO) per optimizer step; prompts per rollout (PPO)."""
    max_length: int = 256
    steps: int = 6
    """Optimizer steps per process, the first WARMUP_STEPS of them not timed."""
    ppo_steps: int = 3
    threads: int = 2
    lr: float = 1e-4
    train_gradient_checkpointing: bool = False
    """SFT, RM and DPO: activation checkpointing on both sides (ours ``model.gradient_checkpointing``, TRL's
    ``gradient_checkpointing``); on for the 0.5b workload."""
    seed: int = 0
    sft_data: str = "embedded:sft_train"
    pref_data: str = "embedded:pref_train"
    dpo_beta: float = 0.1
    # PPO
    ppo_mini_batch_size: int = 8
    ppo_epochs: int = 2
    max_new_tokens: int = 48
    max_prompt_length: int = 192
    temperature: float = 1.0
    kl_coef: float = 0.05
    ppo_gradient_checkpointing: bool | str = True
    """PPO only, on every side: activation checkpointing in the training forwards (ours: the whole shared
    backbone; naive: policy and critic; TRL: its policy, as PPOTrainer applies it). At 135M parameters the
    activations, not the weight copies, dominate PPO's memory; with them checkpointed the comparison shows
    what sharing one backbone saves. ``selective``: ours only (bench/profile_ppo.py)."""
    # GRPO (max_new_tokens, max_prompt_length and temperature are shared with PPO)
    grpo_steps: int = 3
    """Rollout steps per GRPO process (each: one rollout, then ``grpo_epochs`` optimizer updates); the first
    is warm-up, not timed."""
    grpo_batch_size: int = 4
    """Prompts per rollout step (ours ``grpo.batch_size``; TRL: ``per_device_train_batch_size`` = prompts x
    generations, since TRL counts completions)."""
    grpo_num_generations: int = 8
    """G, responses per prompt (ours ``grpo.num_generations``, TRL ``num_generations``)."""
    grpo_epochs: int = 2
    """Passes over each rollout, one update each (ours ``grpo.passes`` with one minibatch, TRL
    ``num_iterations``)."""
    grpo_beta: float = 0.0
    """KL weight: 0 on both sides, so neither runs a reference forward."""
    grpo_gradient_checkpointing: bool = True
    """Activation checkpointing in GRPO's training forwards on both sides (TRL's GRPOConfig default; ours
    ``model.gradient_checkpointing``); generation runs without it on both (KV cache)."""
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(asdict(self))


HH = "data/hh/train.jsonl"
WORKLOADS = {
    "embedded": {},
    "hh": {"sft_data": HH, "pref_data": HH, "max_length": 512, "batch_size": 8, "ppo_mini_batch_size": 8,
           "max_new_tokens": 128, "max_prompt_length": 384},
    "0.5b": {"sft_data": HH, "pref_data": HH, "max_length": 512, "batch_size": 4, "ppo_mini_batch_size": 4,
             "max_new_tokens": 128, "max_prompt_length": 384, "train_gradient_checkpointing": True,
             "model": "random:0.5b"},
}
"""``make bench WORKLOAD=...``: the settings a workload changes. ``embedded``: the synthetic task (short rows, the
checker); ``hh``: real dialogues, the HH-harmless slice (data/hh/train.jsonl; SFT on prompt + chosen); ``0.5b``:
the same dialogues on a random Llama of about half a billion parameters (SmolLM2's tokenizer; a GPU machine has
no checkpoint to load), SFT / RM / DPO with activation checkpointing on both sides (without it TRL's DPO needs more
than 24 GiB). Both HH workloads keep rows whole up to 512 tokens (prompts up to 384, 128 new tokens in PPO); the
plan (bench/plan.py) takes only rows that fit, so no side truncates."""
WORKLOAD_STAGES = {"embedded": ["sft", "rm", "dpo", "ppo", "grpo"], "hh": ["sft", "rm", "dpo", "ppo"],
                   "0.5b": ["sft", "rm", "dpo", "ppo"]}
"""The stages each workload runs by default: GRPO's reward is the embedded checker, which HH rows have no
constraint for, so the HH workloads leave it out."""
PLANNED = ("sft", "rm", "dpo", "ppo")
"""Stages whose rows come from a batch plan (bench/plan.py); GRPO reads the workload's source (its checker needs
the embedded rows' constraints)."""


def data_for(stage: str, s: "Settings") -> str:
    """The data a stage reads on every side: its plan file when run.py made one, else the workload's source."""
    plan = s.extra.get("plans", {}).get(stage)
    if plan:
        return plan
    return s.sft_data if stage == "sft" else s.pref_data


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def cuda_active():
    """torch, when this process has imported it and initialised CUDA; else None (no import here)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch


def set_threads(n: int) -> None:
    """Fix the CPU threads of this process (both sides call this before any torch work)."""
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_dims(path: str | Path) -> dict:
    """Parameter counts and shapes for the FLOP convention above, from the checkpoint's config.json."""
    cfg = json.loads((ROOT / path / "config.json").read_text() if not Path(path).is_absolute()
                     else (Path(path) / "config.json").read_text())
    d, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    ff, V = cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim", d // heads)
    attn = d * heads * hd + 2 * d * kv * hd + heads * hd * d  # q, k, v, o
    mlp = 3 * d * ff  # gate, up, down
    norms = 2 * d
    n_body = L * (attn + mlp + norms) + d
    return {"n_body": n_body, "n_head": V * d, "n_layer": L, "d_model": d, "vocab": V}


def fwd_flops_per_token(dims: dict, T: float, lm_head: bool = True) -> float:
    n = dims["n_body"] + (dims["n_head"] if lm_head else 0)
    return 2 * n + 4 * dims["n_layer"] * dims["d_model"] * T


def seq_flops(dims: dict, lengths: list[int], kind: str) -> float:
    """Model FLOPs for sequences of the given real lengths. ``kind``: train | train_body | fwd | fwd_body."""
    total = 0.0
    for T in lengths:
        body_only = kind.endswith("_body")
        f = fwd_flops_per_token(dims, T, lm_head=not body_only)
        total += T * (2 * f if kind.startswith("train") else f)
    return total


def tree_flops(dims: dict, depths: list[int], kind: str) -> float:
    """Model FLOPs for the tokens of packed rows with shared prefixes (:mod:`deltalign.data.sharing`): each token
    computed once, its attention charged as :func:`seq_flops` charges a sequence position (a token at depth t
    attends to t + 1 others; over a plain sequence this sums to what seq_flops gives, plus 4 L d T)."""
    body_only = kind.endswith("_body")
    n = dims["n_body"] + (0 if body_only else dims["n_head"])
    f = sum(2 * n + 8 * dims["n_layer"] * dims["d_model"] * (t + 1) for t in depths)
    return 2 * f if kind.startswith("train") else f


class StepTimer:
    """Times optimizer steps and counts work per step; the window starts after WARMUP_STEPS steps."""

    def __init__(self):
        self.ends: list[float] = []
        self.work: list[dict] = []  # work done in each step (tokens, pairs, samples, flops)
        self._cur: dict = {}

    def add(self, **kw) -> None:
        for k, v in kw.items():
            self._cur[k] = self._cur.get(k, 0) + v

    def step_end(self) -> None:
        torch = cuda_active()
        if torch is not None:  # kernels are asynchronous: the step ends when the GPU is done
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.work.append(self._cur)
        self._cur = {}

    def summary(self) -> dict:
        if len(self.ends) <= WARMUP_STEPS:
            raise RuntimeError(f"only {len(self.ends)} steps ran; need more than {WARMUP_STEPS} to time")
        seconds = self.ends[-1] - self.ends[WARMUP_STEPS - 1]
        timed = self.work[WARMUP_STEPS:]
        sums: dict = {}
        for w in timed:
            for k, v in w.items():
                sums[k] = sums.get(k, 0) + v
        out = {"seconds": seconds, "timed_steps": len(timed), "s_per_step": seconds / len(timed)}
        for k, v in sums.items():
            out[k] = v
            out[f"{k}_per_s"] = v / seconds
        return out


def emit(result: dict) -> None:
    """Print the one result line the orchestrator reads (peak RSS of this whole process added)."""
    result = dict(result)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    torch = cuda_active()
    if torch is not None:
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()


def parse_result(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return None


def pref_rows_for_trl(source: str) -> list[dict]:
    """The same preference rows our side reads, as conversational prompt/chosen/rejected dicts."""
    from deltalign.data.formats import load_rows

    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in load_rows(source)]


def sft_rows_for_trl(source: str) -> list[dict]:
    """The same SFT rows our side reads (``messages``), as conversational prompt/completion, so that TRL computes
    the loss on the completion only, as ours does."""
    from deltalign.data.formats import load_rows

    out = []
    for r in load_rows(source):
        msgs = r["messages"]
        out.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    return out


def spawn(cmd: list[str], log: Path, timeout: float) -> tuple[int, float, float, str]:
    """Run one fresh process (offline, output to ``log``), killed after ``timeout`` seconds: its exit status, wall
    seconds, its own peak RSS in MB (``os.wait4``) and the log's text."""
    log.parent.mkdir(parents=True, exist_ok=True)
    pythonpath = os.pathsep.join(x for x in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if x)  # e.g. a test's
    env = dict(os.environ, PYTHONPATH=pythonpath, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.time() - t0 > timeout:
                p.kill()
                pid, status, usage = os.wait4(p.pid, 0)
                break
            time.sleep(0.2)
    return (os.waitstatus_to_exitcode(status), time.time() - t0, usage.ru_maxrss / 1024,
            log.read_text(errors="replace"))


# --- random:SIZE models ---------------------------------------------------------------------------------------------

RANDOM_PREFIX = "random:"
TOKENIZER_FROM = Path("models/SmolLM2-135M-Instruct")
"""SmolLM2's tokenizer (with its chat template): the only files of the checkpoint a ``random:`` model needs."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json")
VOCAB = 49152  # SmolLM2's; bos 1, eos 2 (= pad, as in SmolLM2's config)
RANDOM_LAYERS = 24
TINY_SHAPE = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)


def llama_params(shape: dict, vocab: int = VOCAB) -> int:
    """Parameters of a Llama with tied embeddings: embedding + layers (attention, MLP, 2 norms) + final norm."""
    d, ff, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    h, kv, hd = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    return vocab * d + L * (2 * d * h * hd + 2 * d * kv * hd + 3 * d * ff + 2 * d) + d


def random_shape(size: str) -> dict:
    """The Llama shape of ``random:SIZE`` (SIZE: ``tiny``, or a parameter count such as ``0.5b``, ``135m``).

    The rule: SmolLM2's vocabulary (49,152) with tied embeddings, head size 64, key/value heads = heads / 3
    (SmolLM2's grouping), MLP width 8/3 of the hidden size rounded up to a multiple of 64, 24 layers; the hidden size
    is the multiple of 192 (3 heads of 64) whose total parameter count is nearest the target. E.g. 0.1b: hidden
    576 (SmolLM2-135M's width), 113M; 0.5b: hidden 1344, 21 heads / 7 key-value, MLP 3584, 528M; 1b: hidden 1920,
    1.04B. ``tiny``: hidden 64, 2 layers, 4 heads of 16 / 2 key-value, MLP 192: 3.3M, almost all embedding (tests).
    """
    if size == "tiny":
        return dict(TINY_SHAPE)
    units = {"b": 1e9, "m": 1e6, "k": 1e3}
    try:
        target = float(size[:-1]) * units[size[-1].lower()] if size[-1:].lower() in units else float(size)
    except ValueError:
        raise ValueError(f"random:{size}: SIZE is 'tiny' or a parameter count like 0.5b or 135m") from None

    def shape(k: int) -> dict:
        d = 192 * k
        return dict(hidden_size=d, intermediate_size=-(-8 * d // 3 // 64) * 64, num_hidden_layers=RANDOM_LAYERS,
                    num_attention_heads=3 * k, num_key_value_heads=k, head_dim=64)

    best = min((shape(k) for k in range(1, 65)), key=lambda s: abs(llama_params(s) - target))
    if abs(llama_params(best) - target) > 0.5 * target:
        raise ValueError(f"random:{size}: no shape of this rule near {target:.3g} parameters (from ~20m to ~20b; "
                         "random:tiny for a few M)")
    return best


def write_random_llama(shape: dict, out: Path, seed: int = 0, meta: dict | None = None) -> int:
    """A Llama of ``shape`` with SmolLM2's vocabulary (tied embeddings), weights from ``torch.manual_seed(seed)``,
    written to ``out`` (float32 safetensors, SmolLM2's tokenizer files, ``random.json`` with ``meta`` if given)
    through a temporary folder renamed at the end. Returns its parameter count."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**shape, vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).to(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="100GB")
    src = ROOT / TOKENIZER_FROM
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, tmp / name)
    if meta is not None:
        (tmp / "random.json").write_text(json.dumps({**meta, "n_params": n_params}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return n_params


def build_random(size: str, seed: int = 0, cache: Path | None = None) -> tuple[Path, int]:
    """``random:SIZE`` as a checkpoint directory (written once, reused): the shape of :func:`random_shape`,
    weights from ``torch.manual_seed(seed)`` (float32, safetensors), SmolLM2's tokenizer files. Returns the
    directory and its parameter count. Only torch and transformers are needed, and the tokenizer files of
    ``models/SmolLM2-135M-Instruct`` (not its weights)."""
    shape = random_shape(size)
    out = (cache or ROOT / "bench" / ".cache") / f"random-{size}"
    marker = out / "random.json"
    want = {"model": RANDOM_PREFIX + size, "shape": shape, "seed": seed, "vocab": VOCAB}
    if marker.is_file():
        got = json.loads(marker.read_text())
        if {k: got.get(k) for k in want} == want:
            return out, got["n_params"]
    src = ROOT / TOKENIZER_FROM
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{src}/tokenizer.json not found: random:{size} uses SmolLM2's tokenizer. Copy these files of "
            f"{TOKENIZER_FROM} along (3.5 MB; models/ is git-ignored): " + ", ".join(TOKENIZER_FILES[:4]))
    return out, write_random_llama(shape, out, seed, meta=want)


if __name__ == "__main__":  # python bench/common.py --build-random SIZE [--seed S]: run.py's model-building child
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--build-random", required=True, metavar="SIZE")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    path, n = build_random(a.build_random, a.seed)
    emit({"stage": "build_random", "path": str(path.relative_to(ROOT)), "n_params": n})
