"""Every delta method on the one backbone: the base and a frozen reference stay bit-identical while the trained delta
changes; a save/load round trip gives the same logits; hidden states stay aligned with the caller's ids (so a head's
last-token score, labels and positions are right, whatever the padding); mixed methods switch correctly."""

import json
from dataclasses import fields

import pytest
import torch

from deltalign import deltas
from deltalign.model.backbone import AdapterConfig, Backbone, ModelConfig
from deltalign.model.labelled import labelled_logits
from deltalign.losses import sft_loss_sum
from deltalign.rewards.model import last_token_values

TINY = ModelConfig(path="tiny")
METHODS = list(deltas.METHODS)
SMALL = dict(r=4, alpha=8, dropout=0.0, prefix_length=3, prompt_length=3, bottleneck_size=8)


def cfg(method, **kw):
    return AdapterConfig(method=method, **(SMALL | kw))


def values(params: dict) -> dict:
    return {n: p.detach().clone() for n, p in params.items()}


def base_state(bb):
    return {n: (p, p.detach().clone()) for n, p in bb.causal_lm.named_parameters() if ".lora_" not in n}


def assert_unchanged(state, what="base"):
    for n, (p, v) in state.items():
        assert torch.equal(p, v), f"{what} tensor {n} changed"


def nudge(bb, name, scale=0.3, seed=0):
    """Move a delta away from its (often identity) initialisation, so that it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bb.adapter_parameters(name).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def train(bb, batch, steps=3, head=None):
    opt = torch.optim.AdamW(bb.trainable_parameters(), lr=1e-2)
    for _ in range(steps):
        logits, targets, _ = labelled_logits(bb, bb, batch)
        loss, _ = sft_loss_sum(logits, targets)
        if head:
            loss = loss + last_token_values(bb(batch["input_ids"], batch["attention_mask"], head=head),
                                            batch["attention_mask"]).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()


def logits(bb, batch, name):
    with torch.no_grad(), bb.using(name):
        return bb.lm_logits(bb(batch["input_ids"], batch["attention_mask"]))[batch["attention_mask"].bool()]


def test_the_table_and_the_config_agree():
    import typing

    hints = typing.get_type_hints(AdapterConfig)
    assert set(typing.get_args(hints["method"])) == set(METHODS)
    assert {"lora", "dora", "ia3", "prefix", "prompt", "bottleneck", "ln"} <= set(METHODS)
    for m in deltas.METHODS.values():
        assert m.impl in ("peft", "ours") and m.summary
        assert m.mergeable == (m.name in ("lora", "dora", "ia3", "ln"))
        assert m.prompt_learning == (m.name in ("prefix", "prompt"))
    from deltalign.pipeline.help import field_docs

    docs = field_docs(AdapterConfig)
    assert all(docs[f.name] for f in fields(AdapterConfig)), "every adapter setting is documented"


@pytest.mark.parametrize("method", METHODS)
def test_a_method_trains_only_itself_and_round_trips(method, batch, tmp_path):
    torch.manual_seed(0)
    bb = Backbone.load(TINY)
    before = base_state(bb)
    bb.add_adapter("ref", cfg(method), trainable=False)
    nudge(bb, "ref")  # a reference that differs from the policy and from the base
    bb.add_adapter("policy", cfg(method), trainable=True)
    bb.add_head("value")
    ref0, pol0 = values(bb.adapter_parameters("ref")), values(bb.adapter_parameters("policy"))
    assert ref0 and pol0
    trainable = {id(p) for p in bb.parameters() if p.requires_grad}
    wanted = {id(p) for p in bb.adapter_parameters("policy").values()} | {id(p) for p in bb.heads.parameters()}
    assert trainable == wanted
    bb.activate("ref")  # activating a frozen delta never unfreezes it
    assert {id(p) for p in bb.parameters() if p.requires_grad} == wanted
    bb.activate("policy")
    train(bb, batch, steps=3, head="value")  # >= 2 steps: a zero-initialised half (LoRA B, adapter up) moves first
    assert_unchanged(before)
    assert_unchanged({n: (p, ref0[n]) for n, p in bb.adapter_parameters("ref").items()}, "reference")
    unchanged = [n for n, p in bb.adapter_parameters("policy").items() if torch.equal(p, pol0[n])]
    assert not unchanged, f"policy tensors that did not train: {unchanged}"
    trained, ref, base = logits(bb, batch, "policy"), logits(bb, batch, "ref"), logits(bb, batch, None)
    assert (trained - base).abs().max() > 1e-4 and (ref - base).abs().max() > 1e-4
    assert bb.active == "policy"

    # save / load: the folder says its method; loaded frozen on a fresh backbone or trainable beside the original
    bb.save_adapter("policy", tmp_path / "a")
    assert deltas.method_of(tmp_path / "a") == method
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "a").glob("*.bin")) and not list((tmp_path / "a").glob("*.pt"))
    fresh = Backbone.load(TINY)
    fresh.load_adapter("policy", tmp_path / "a", trainable=False)
    assert not any(p.requires_grad for p in fresh.parameters())
    torch.testing.assert_close(logits(fresh, batch, "policy"), trained, atol=1e-6, rtol=0)
    bb.load_adapter("copy", tmp_path / "a", trainable=True)
    torch.testing.assert_close(logits(bb, batch, "copy"), trained, atol=1e-6, rtol=0)
    assert all(p.requires_grad for p in bb.adapter_parameters("copy").values())


@pytest.mark.parametrize("method", METHODS)
def test_outputs_stay_aligned_with_the_callers_ids(method):
    """Each row alone, unpadded, gives the same hidden states and last-token head score as inside a batch padded on
    either side: virtual tokens never shift a label, a position or the reward head's last token."""
    torch.manual_seed(0)
    bb = Backbone.load(TINY)
    bb.add_adapter("d", cfg(method))
    nudge(bb, "d")
    bb.add_head("rm")
    bb.eval()
    rows = [[5, 9, 40, 77, 3, 12, 8], [100, 7, 7], [50, 60, 70, 80, 90]]
    alone = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r])
            alone.append(bb(ids, torch.ones_like(ids))[0])
            assert alone[-1].shape == (len(r), bb.hidden_size)
        for side in ("right", "left"):
            from deltalign.data.batching import pad_batch

            b = pad_batch(rows, bb.tokenizer.pad_token_id, pad_side=side)
            hidden = bb(b["input_ids"], b["attention_mask"])
            assert hidden.shape[:2] == b["input_ids"].shape
            for i, r in enumerate(rows):
                got = hidden[i][b["attention_mask"][i].bool()]
                torch.testing.assert_close(got, alone[i], atol=1e-5, rtol=1e-5)
            scores = last_token_values(bb(b["input_ids"], b["attention_mask"], head="rm"), b["attention_mask"])
            expected = torch.stack([bb.heads["rm"](a[-1]) for a in alone])
            torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy, reward", [("prefix", "lora"), ("prompt", "ia3"), ("bottleneck", "dora"),
                                            ("lora", "ln"), ("ia3", "prompt")])
def test_mixed_methods_on_one_backbone_switch_correctly(policy, reward, batch, tmp_path):
    """PPO's layout with mixed methods: a frozen reward delta + head, a frozen reference and a trainable copy of it.
    Each role gives exactly what it gives alone on a fresh backbone; training the policy while the others are
    switched in between forward and backward moves only the policy."""
    torch.manual_seed(0)
    src = Backbone.load(TINY)
    for name, method in (("rm", reward), ("sft", policy)):
        src.add_adapter(name, cfg(method))
        nudge(src, name, seed=len(name))
        src.save_adapter(name, tmp_path / name)
    src.add_head("rm")
    src.save_head("rm", tmp_path / "rm" / "head.safetensors")

    alone = {}
    for name in ("rm", "sft"):
        b = Backbone.load(TINY)
        b.load_adapter(name, tmp_path / name)
        alone[name] = logits(b, batch, name)
    alone[None] = logits(Backbone.load(TINY), batch, None)

    bb = Backbone.load(TINY)
    before = base_state(bb)
    bb.load_adapter("sft", tmp_path / "sft", trainable=False)
    bb.load_adapter("rm", tmp_path / "rm", trainable=False)
    bb.load_head("rm", tmp_path / "rm" / "head.safetensors", trainable=False)
    bb.load_adapter("ppo", tmp_path / "sft", trainable=True)
    assert sorted(bb.adapters) == ["ppo", "rm", "sft"] and bb.active == "ppo"
    for name in ("rm", "sft", None):
        torch.testing.assert_close(logits(bb, batch, name), alone[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(bb, batch, "ppo"), alone["sft"], atol=1e-6, rtol=0)  # a copy: equal at start
    frozen = {n: (p, p.detach().clone()) for name in ("sft", "rm") for n, p in bb.adapter_parameters(name).items()}
    frozen |= {f"head.{n}": (p, p.detach().clone()) for n, p in bb.heads["rm"].named_parameters()}

    opt = torch.optim.AdamW(bb.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        logits_, targets, _ = labelled_logits(bb, bb, batch)
        loss, _ = sft_loss_sum(logits_, targets)
        with torch.no_grad(), bb.using("rm"):  # score and reference in between forward and backward, as PPO does
            score = last_token_values(bb(batch["input_ids"], batch["attention_mask"], head="rm"),
                                      batch["attention_mask"])
        with torch.no_grad(), bb.using("sft"):
            bb(batch["input_ids"], batch["attention_mask"])
        assert bb.active == "ppo"
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(score).all()
    assert_unchanged(before)
    assert_unchanged(frozen, "frozen role")
    assert (logits(bb, batch, "ppo") - alone["sft"]).abs().max() > 1e-5
    for name in ("rm", "sft", None):  # the others still give exactly what they gave alone
        torch.testing.assert_close(logits(bb, batch, name), alone[name], atol=1e-6, rtol=0)


def test_an_own_adapter_folder_says_its_method_and_never_pickles(tmp_path):
    bb = Backbone.load(TINY)
    bb.add_adapter("p", cfg("prefix", prefix_projection=True, prefix_hidden=16))
    bb.save_adapter("p", tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["deltalign_method"] == "prefix" and conf["settings"]["prefix_projection"] is True
    assert conf["base_model_name_or_path"] == "tiny"
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="adapter_model.bin"):
        bb.load_adapter("other", tmp_path)


def test_prompt_init_text_and_a_wrong_base_are_clear(tmp_path):
    bb = Backbone.load(TINY)
    bb.add_adapter("p", cfg("prompt", prompt_length=5, init_text="hi"))
    emb = bb.causal_lm.get_input_embeddings().weight
    ids = bb.tokenizer("hi", add_special_tokens=False)["input_ids"]
    soft = bb.adapter_parameters("p")
    (w,) = soft.values()
    expected = emb[[ids[i % len(ids)] for i in range(5)]]
    torch.testing.assert_close(w, expected)
    with pytest.raises(ValueError, match="unknown adapter"):
        bb.activate("nope")
    with pytest.raises(ValueError, match="already attached"):
        bb.add_adapter("p", cfg("ln"))


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(method, batch):
    """transformers drops a KV cache under checkpointing unless a layer says it only reads it: the prefix must still
    be seen (and get its gradient) in the recomputed layers, and every hook must act the same in the replay."""
    grads = []
    for checkpointing in (False, True, "selective"):
        torch.manual_seed(0)
        bb = Backbone.load(ModelConfig(path="tiny", gradient_checkpointing=checkpointing))
        bb.add_adapter("d", cfg(method))
        nudge(bb, "d")
        bb.train()
        assert bb.causal_lm.is_activation_checkpointing == bool(checkpointing)
        logits_, targets, _ = labelled_logits(bb, bb, batch)
        sft_loss_sum(logits_, targets)[0].backward()
        grads.append({n: p.grad.clone() for n, p in bb.adapter_parameters("d").items()})
    assert all(g.abs().sum() > 0 for g in grads[0].values())
    for recomputed in grads[1:]:
        for n, g in grads[0].items():
            torch.testing.assert_close(recomputed[n], g, atol=1e-6, rtol=1e-5)


def test_lora_dropout_zeroes_a_share_of_inputs_scales_the_rest_and_replays_by_seed():
    """LoRA's dropout on the delta's input is ours (one uniform draw per element against p: peft's nn.Dropout draws
    a Bernoulli mask, the slowest op of a CPU step at 150-700-token rows), with nn.Dropout's semantics."""
    bb = Backbone.load(ModelConfig(path="tiny"))
    bb.add_adapter("d", AdapterConfig(r=4, dropout=0.25))
    drops = [m for n, m in bb.causal_lm.named_modules() if n.endswith("lora_dropout.d")]
    assert drops and all(isinstance(m, deltas.lora.MaskDropout) for m in drops)
    m = drops[0]
    m.train()
    x = torch.ones(400, 50, requires_grad=True)
    torch.manual_seed(0)
    y = m(x)
    assert set(y.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert abs((y == 0).float().mean().item() - 0.25) < 0.02
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d y / d x = mask / (1 - p)
    torch.manual_seed(0)
    assert torch.equal(m(x), y)
    m.eval()
    assert torch.equal(m(x), x)
    bb.add_adapter("none", AdapterConfig(r=4, dropout=0.0))  # p = 0 stays peft's identity
    assert not any(isinstance(m, deltas.lora.MaskDropout) for n, m in bb.causal_lm.named_modules()
                   if n.endswith("lora_dropout.none"))
