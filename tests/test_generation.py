"""Generation on the tiny random Llama, sharpened so greedy outputs depend on the prompt and stop at varied lengths."""

import copy

import pytest
import torch

from deltalign.model.backbone import AdapterConfig, Backbone, ModelConfig
from deltalign.data.formats import PrefExample, SFTExample
from deltalign.data.tokenize import tokenize_prompt
from deltalign.sampling.generation import (GenerationConfig, RowSampler, checker_eval, decode, generate, in_lockstep,
                                  stop_token_ids)
from deltalign.rewards.checker import describe

TEXTS = ["hi", "hello there friend", "a", "what is the capital of france?", "x" * 30, "Answer in lowercase.",
         "tell me a joke", "ok"]


def sharp_backbone() -> Backbone:
    """The tiny backbone with larger random weights (prompt-dependent greedy output) and a boosted eos row
    (greedy responses end with eos after a few tokens for most of TEXTS, not all)."""
    b = Backbone.load(ModelConfig(path="tiny"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in b.model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        b.model.get_input_embeddings().weight[b.tokenizer.eos_token_id] *= 3  # tied: also the eos logit row
    return b


@pytest.fixture(scope="module")
def bb():
    return sharp_backbone()


def prompts(b, texts=TEXTS):
    return [tokenize_prompt([{"role": "user", "content": t}], b.tokenizer, True) for t in texts]


def test_batched_matches_one_by_one_in_input_order(bb):
    ids = prompts(bb)
    assert len({len(p) for p in ids}) > 4  # lengths differ: sorting and padding really happen
    cfg = GenerationConfig(max_new_tokens=24, batch_size=3)
    batched = generate(bb, ids, cfg)
    single = [generate(bb, [p], cfg)[0] for p in ids]
    assert batched == single
    assert len({tuple(r) for r in batched}) > 4  # outputs depend on the prompt, so order is really checked
    assert generate(bb, ids[::-1], cfg) == batched[::-1]


def test_lockstep_runs_the_others_batches_and_steps_and_gives_the_same_tokens(bb):
    """In lockstep (ZeRO-3, sharded weights) a process decodes until every process is done and runs as many
    batches as the process with the most: simulated here by reducers that say "not done" for longer and "the others
    have 2 more batches". Every forward counted; the tokens are those of a plain call."""
    ids = prompts(bb)[:5]
    cfg = GenerationConfig(max_new_tokens=24, batch_size=2, temperature=0.7)
    plain = generate(bb, ids, cfg, seed=3)
    calls = {"forward": 0, "all_done": 0}

    def all_done(flag: bool) -> bool:  # the other process finishes each batch only at the last token
        calls["all_done"] += 1
        return False

    hook = bb.model.model.layers[0].register_forward_pre_hook(lambda m, a: calls.__setitem__("forward",
                                                                                            calls["forward"] + 1))
    try:
        with in_lockstep(all_done, lambda n: n + 2):
            synced = generate(bb, ids, cfg, seed=3)
            nothing = generate(bb, [], cfg)  # a process with no rows still runs every batch
    finally:
        hook.remove()
    assert synced == plain and nothing == []
    assert max(len(r) for r in plain) < cfg.max_new_tokens  # plain stopped early: lockstep really stepped on
    batches = (3 + 2) + (0 + 2)  # 3 batches of its own + 2 dummies; then 0 + 2 dummies
    assert calls["forward"] == batches * cfg.max_new_tokens  # prefill + 23 cached steps, every batch
    assert calls["all_done"] == batches * cfg.max_new_tokens


def test_left_padding_matches_unpadded(bb):
    short, long = prompts(bb, ["hi", "x" * 40])
    cfg = GenerationConfig(max_new_tokens=16)
    assert generate(bb, [short, long], cfg)[0] == generate(bb, [short], cfg)[0]


def test_stops_at_eos_and_has_no_pad(bb):
    tok = bb.tokenizer
    assert tok.pad_token_id != tok.eos_token_id
    cfg = GenerationConfig(max_new_tokens=3, batch_size=8)  # short: some rows end, some are cut
    out = generate(bb, prompts(bb), cfg)
    ended = [r for r in out if r[-1] == tok.eos_token_id]
    assert ended and len(ended) < len(out)  # both kinds present in one batch: finished rows got padded
    for r in out:
        assert tok.pad_token_id not in r
        assert tok.eos_token_id not in r[:-1]
        if r[-1] != tok.eos_token_id:
            assert len(r) == cfg.max_new_tokens


@pytest.mark.parametrize("m", [1, 3, 7])
def test_max_new_tokens(bb, m):
    out = generate(bb, prompts(bb), GenerationConfig(max_new_tokens=m, temperature=1.0), seed=3)
    assert all(1 <= len(r) <= m for r in out)
    assert any(len(r) == m for r in out)


def test_sampling_is_seeded_and_leaves_caller_rng_alone(bb):
    ids, cfg = prompts(bb), GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, batch_size=4)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(bb, ids, cfg, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert generate(bb, ids, cfg, seed=1) == a
    assert generate(bb, ids, cfg, seed=2) != a
    assert generate(bb, ids, GenerationConfig(max_new_tokens=12), seed=1) != a  # greedy is not sampling


def test_a_prompts_sample_depends_on_its_seed_alone_not_on_its_batch(bb):
    ids, seeds = prompts(bb), [101 + 7 * i for i in range(len(TEXTS))]
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, batch_size=8)
    full = generate(bb, ids, cfg, row_seeds=seeds)
    assert len({tuple(r) for r in full}) > 4
    # other batch sizes, other company, other order: each prompt's response stays the same
    assert generate(bb, ids, GenerationConfig(max_new_tokens=12, temperature=1.0, batch_size=3), row_seeds=seeds) == full
    assert generate(bb, ids[4:], cfg, row_seeds=seeds[4:]) == full[4:]
    assert generate(bb, ids[::-1], cfg, row_seeds=seeds[::-1]) == full[::-1]
    assert generate(bb, ids, cfg, row_seeds=[s + 1 for s in seeds]) != full
    with pytest.raises(ValueError, match="row seeds"):
        generate(bb, ids, cfg, row_seeds=seeds[:2])


@pytest.mark.parametrize("temperature, top_p, expected", [
    (1.0, 1.0, [0.5, 0.3, 0.15, 0.05]),
    (2.0, 1.0, None),  # softmax(log p / 2), computed below
    (1.0, 0.7, [0.625, 0.375, 0.0, 0.0]),  # nucleus {0.5, 0.3}: the mass before 0.15 is 0.8 >= 0.7
])
def test_row_sampler_draws_from_the_tempered_nucleus_distribution(temperature, top_p, expected):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    if expected is None:
        expected = torch.softmax(probs.log() / temperature, -1).tolist()
    n = 20_000
    sampler = RowSampler(list(range(n)), temperature, top_p, steps=2)
    scores = torch.cat([probs.log(), torch.tensor([float("-inf")])]).expand(n, -1).clone()  # a 5th, suppressed token
    rows = torch.arange(n)
    for step in (0, 1):
        picks = sampler.draw(scores, rows, step)
        freq = torch.bincount(picks, minlength=5).float() / n
        # binomial std at n=20000 is <= 0.0036; 0.015 is > 4 sigma
        torch.testing.assert_close(freq, torch.tensor([*expected, 0.0]), atol=0.015, rtol=0)
        if top_p < 1:
            assert freq[2] == 0 and freq[3] == 0
    assert not torch.equal(sampler.draw(scores, rows, 0), sampler.draw(scores, rows, 1))  # a fresh draw per step
    some = torch.tensor([5, 17, 3])  # a row's draw depends on its own stream only, not on the rows beside it
    assert torch.equal(sampler.draw(scores[:3], some, 1), sampler.draw(scores, rows, 1)[some])


def test_eval_mode_during_generation_and_restored():
    b = sharp_backbone()
    b.model.train()
    b.model.model.layers[0].eval()  # a mixed state must come back exactly
    seen = []
    hook = b.model.model.layers[1].register_forward_pre_hook(lambda m, a: seen.append(m.training))
    generate(b, prompts(b, ["hi"]), GenerationConfig(max_new_tokens=3))
    hook.remove()
    assert seen and not any(seen)
    assert b.model.training and b.model.model.layers[1].training and not b.model.model.layers[0].training


def test_stop_tokens_include_end_of_turn_when_eos_differs(bb):
    tok = copy.deepcopy(bb.tokenizer)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tok) == [im_end]
    tok.eos_token = "<|im_start|>"  # an eos that is not the template's end-of-turn
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_start|>"), im_end]


def test_decode_skips_specials_and_strips(bb):
    tok = bb.tokenizer
    ids = tok("  hello ", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert decode(bb, [ids]) == ["hello"]


def examples():
    constraints = [{"kind": "lowercase"}, {"kind": "max_words", "n": 30}, {"kind": "start_word", "word": "Yes"},
                   {"kind": "forbidden_word", "word": "cat"}, {"kind": "uppercase"}, {"kind": "max_words", "n": 5}]
    exs = [PrefExample([{"role": "user", "content": f"Q{i}? {describe(c)}"}], "a", "b", True)
           for i, c in enumerate(constraints)]
    exs.append(SFTExample([{"role": "user", "content": "Say hi. Answer in all lowercase letters."}], "hi", True))
    return exs


def test_checker_eval_shape(bb):
    exs = examples()
    res = checker_eval(bb, exs, GenerationConfig(max_new_tokens=16))
    assert res["n"] == len(exs) == len(res["scores"])
    assert 0.0 <= res["checker_score"] <= 1.0
    assert res["checker_score"] == pytest.approx(sum(res["scores"]) / len(exs))
    assert all(s in (0.0, 1.0) for s in res["scores"])
    assert 0 < res["mean_response_tokens"] <= 16
    assert len(res["samples"]) == 5 and res["samples"][0]["prompt"] == exs[0].prompt[-1]["content"]
    assert any(r["score"] == 1.0 for r in res["samples"])  # forbidden_word / max_words pass on non-empty text


def test_checker_eval_adapter_none_disables_adapters():
    exs, cfg = examples(), GenerationConfig(max_new_tokens=16)
    base = checker_eval(sharp_backbone(), exs, cfg, adapter=None)  # no adapters at all: just the base
    b = sharp_backbone()
    b.add_adapter("policy", AdapterConfig(r=4, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in b.adapter_parameters("policy").values():
            p.copy_(torch.randn(p.shape, generator=g) * 2.0)  # lora_A and lora_B: a large delta
    tuned = checker_eval(b, exs, cfg, adapter="policy")
    assert tuned["samples"] != base["samples"]  # the adapter really changes the output
    assert checker_eval(b, exs, cfg, adapter=None)["samples"] == base["samples"]
    assert b.active == "policy"
    assert checker_eval(b, exs, cfg, adapter="policy")["samples"] == tuned["samples"]  # re-enabled afterwards
    with pytest.raises(ValueError):
        checker_eval(b, exs, cfg, adapter="nope")


# --- every delta method: KV-cache generation equals full forward passes -----------------------------------------

def method_backbone(method: str) -> Backbone:
    """The sharp backbone with a delta of ``method`` pushed far from its initialisation, so it changes the output."""
    from deltalign import deltas  # noqa: F401  (the table drives the parametrisation below)

    b = sharp_backbone()
    torch.manual_seed(0)
    b.add_adapter("d", AdapterConfig(method=method, r=4, dropout=0.0, prefix_length=3, prompt_length=3,
                                     bottleneck_size=8))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in b.adapter_parameters("d").values():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if method in ("ia3", "ln") else 2.0))
    return b


def argmax_without_cache(b: Backbone, prompt: list[int], n: int, stops: list[int]) -> list[int]:
    """Greedy decoding the slow way: a full Backbone.forward over the whole sequence for every new token."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            ids = torch.tensor([seq])
            logits = b.lm_logits(b(ids, torch.ones_like(ids))[0, -1])
            logits[b.tokenizer.pad_token_id] = float("-inf")
            t = int(logits.argmax())
            out.append(t)
            seq.append(t)
            if t in stops:
                break
    return out


METHOD_NAMES = ["lora", "dora", "ia3", "prefix", "prompt", "bottleneck", "ln"]


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_generates_with_kv_cache_as_full_forwards_do(method):
    from deltalign import deltas

    assert set(METHOD_NAMES) == set(deltas.METHODS)
    b = method_backbone(method)
    ids = prompts(b)
    cfg = GenerationConfig(max_new_tokens=10, batch_size=4)  # left-padded batches of different lengths
    cached = generate(b, ids, cfg)
    slow = [argmax_without_cache(b, p, 10, stop_token_ids(b.tokenizer)) for p in ids]
    assert cached == slow
    with b.using(None):
        base = generate(b, ids, cfg)
    assert base != cached  # the delta really acts during generation


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_samples_per_prompt_seed_whatever_the_batch(method):
    b = method_backbone(method)
    ids, seeds = prompts(b), [11 + 5 * i for i in range(len(TEXTS))]
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, batch_size=8)
    full = generate(b, ids, cfg, row_seeds=seeds)
    assert generate(b, ids, GenerationConfig(max_new_tokens=8, temperature=1.0, batch_size=3), row_seeds=seeds) == full
    assert [generate(b, [p], cfg, row_seeds=[s])[0] for p, s in zip(ids, seeds)] == full


# --- decoding: shared prompts, rows that leave, and transformers' generate -------------------------------------

def lora_backbone(attn: str = "sdpa") -> Backbone:
    """The sharp backbone with a large LoRA delta, attending with ``attn``."""
    b = sharp_backbone()
    b.causal_lm.config._attn_implementation = attn
    b.add_adapter("policy", AdapterConfig(r=4, dropout=0.0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in b.adapter_parameters("policy").values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)  # greedy responses of 5 to 18 tokens
    return b


def hf_greedy(b: Backbone, ids: list[list[int]], n: int) -> list[list[int]]:
    """transformers' own greedy ``generate`` (dynamic KV cache, left padding, pad suppressed, stop tokens), cut
    after the first stop token."""
    tok = b.tokenizer
    stops = stop_token_ids(tok)
    width = max(map(len, ids))
    x = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    with torch.no_grad():
        y = b.model.generate(input_ids=x, attention_mask=mask, do_sample=False, max_new_tokens=n, eos_token_id=stops,
                             pad_token_id=tok.pad_token_id, suppress_tokens=[tok.pad_token_id], top_k=None,
                             top_p=None, temperature=None)[:, width:].tolist()
    out = []
    for r in y:
        k = next((i for i, t in enumerate(r) if t in stops), None)
        out.append(r if k is None else r[:k + 1])
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_tokens_equal_transformers_generate_with_groups_and_rows_leaving(attn, monkeypatch):
    """Every prompt three times in one batch (GRPO's groups): one prefill per distinct prompt, rows of different
    lengths, the finished ones leaving the batch (LEAVE_SHARE 0: whenever one finishes); tokens equal transformers'
    greedy generate. sdpa decodes from the shared-prompt cache (its attention counted), eager from
    transformers' own cache."""
    from deltalign.sampling import decoding, generation

    b = lora_backbone(attn)
    ids = prompts(b)
    rows = [p for p in ids for _ in range(3)]
    monkeypatch.setattr(generation, "LEAVE_SHARE", 0)
    kept, calls = [], {"attend": 0, "prefill_rows": 0}
    real_keep, real_attend = decoding.GroupCache.keep, decoding.attend
    monkeypatch.setattr(decoding.GroupCache, "keep", lambda self, r: (kept.append(len(r)), real_keep(self, r)))
    monkeypatch.setattr(decoding, "attend", lambda *a: (calls.__setitem__("attend", calls["attend"] + 1),
                                                        real_attend(*a))[1])
    real_encode = b.encode

    def encode(input_ids, *a, **k):
        if "past" not in k:
            calls["prefill_rows"] += input_ids.shape[0]
        return real_encode(input_ids, *a, **k)

    monkeypatch.setattr(b, "encode", encode)
    with b.using("policy"):
        ours = generate(b, rows, GenerationConfig(max_new_tokens=20, batch_size=len(rows)))
    assert calls["prefill_rows"] == len(ids)  # each distinct prompt prefilled once
    expected = hf_greedy(b, rows, 20)
    assert ours == expected
    assert len({len(r) for r in ours}) > 3  # rows finished at different steps
    if attn == "sdpa":
        assert calls["attend"] > 0 and kept and len(set(kept)) > 1  # rows left, in several rounds
    else:
        assert calls["attend"] == 0


def test_a_groups_samples_depend_on_their_seeds_alone():
    """G samples of one prompt decoded together (one prefill, shared keys/values, rows leaving) are each what that
    row gives alone with its seed; sampling with top-p too."""
    b = lora_backbone()
    ids = prompts(b)[:4]
    rows = [p for p in ids for _ in range(4)]
    seeds = [1000 + 7 * i for i in range(len(rows))]
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.95, batch_size=len(rows))
    with b.using("policy"):
        together = generate(b, rows, cfg, row_seeds=seeds)
        alone = [generate(b, [p], cfg, row_seeds=[s])[0] for p, s in zip(rows, seeds)]
        odd = generate(b, rows[::3], GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.95, batch_size=2),
                       row_seeds=seeds[::3])
    assert together == alone
    assert odd == together[::3]
    assert len({tuple(r) for r in together[:4]}) > 1  # a group's samples differ from each other
