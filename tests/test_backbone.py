"""The invariant everything rests on: only the active delta trains; the base never changes."""

import pytest
import torch

from deltalign.model.backbone import AdapterConfig, Backbone, ModelConfig
from deltalign.model.labelled import labelled_logits, response_logprobs
from deltalign.losses import sft_loss_sum


def base_state(bb):
    """Every base parameter object with a copy of its value (peft later renames but keeps the objects)."""
    return {n: (p, p.detach().clone()) for n, p in bb.causal_lm.named_parameters()}


def assert_unchanged(state):
    for n, (p, value) in state.items():
        assert torch.equal(p, value), f"base parameter {n} changed"


def train_steps(bb, batch, n=3, head=None):
    opt = torch.optim.AdamW(bb.trainable_parameters(), lr=1e-2)
    for _ in range(n):
        logits, targets, _ = labelled_logits(bb, bb, batch)
        loss, _ = sft_loss_sum(logits, targets)
        if head:
            loss = loss + bb(batch["input_ids"], batch["attention_mask"], head=head).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_only_active_adapter_and_head_change(tiny_backbone, batch, method):
    bb = tiny_backbone
    before = base_state(bb)
    bb.add_adapter("ref", AdapterConfig(method=method), trainable=False)
    bb.add_adapter("policy", AdapterConfig(method=method), trainable=True)
    bb.add_head("value")
    ref0 = {n: p.detach().clone() for n, p in bb.adapter_parameters("ref").items()}
    pol0 = {n: p.detach().clone() for n, p in bb.adapter_parameters("policy").items()}
    head0 = {n: p.detach().clone() for n, p in bb.heads["value"].named_parameters()}
    assert ref0 and pol0
    # requires_grad is true for the policy adapter and the head, and nothing else
    trainable = {id(p) for p in bb.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in bb.adapter_parameters("policy").values()} | \
        {id(p) for p in bb.heads["value"].parameters()}
    bb.activate("policy")
    train_steps(bb, batch, n=3, head="value")  # >= 2 steps: LoRA B starts at 0, so A moves from step 2
    assert_unchanged(before)
    for n, p in bb.adapter_parameters("ref").items():
        assert torch.equal(p, ref0[n]), f"frozen adapter tensor {n} changed"
    changed = [n for n, p in bb.adapter_parameters("policy").items() if not torch.equal(p, pol0[n])]
    assert len(changed) == len(pol0), f"unchanged policy tensors: {set(pol0) - set(changed)}"
    assert all(not torch.equal(p, head0[n]) for n, p in bb.heads["value"].named_parameters())


def test_activating_a_frozen_adapter_keeps_it_frozen(tiny_backbone):
    bb = tiny_backbone
    bb.add_adapter("policy", AdapterConfig())
    bb.add_adapter("ref", AdapterConfig(), trainable=False)
    bb.activate("ref")  # peft's set_adapter would make it trainable; ours must not
    assert bb.active == "ref"
    assert not any(p.requires_grad for p in bb.adapter_parameters("ref").values())
    assert all(p.requires_grad for p in bb.adapter_parameters("policy").values())
    with bb.using(None):
        assert not any(p.requires_grad for p in bb.adapter_parameters("ref").values())
    assert bb.active == "ref"


def test_switching_adapters_between_forward_and_backward_keeps_gradients(tiny_backbone, batch):
    bb = tiny_backbone
    bb.add_adapter("policy", AdapterConfig(dropout=0.0))
    bb.add_adapter("ref", AdapterConfig(dropout=0.0), trainable=False)
    with torch.no_grad():  # make the adapters differ from identity so routing matters
        for p in list(bb.adapter_parameters("policy").values()) + list(bb.adapter_parameters("ref").values()):
            p.add_(torch.randn_like(p) * 0.1)
    bb.activate("policy")
    reference = response_logprobs(bb, bb, batch).sum()
    reference.backward()
    expected = {n: p.grad.clone() for n, p in bb.adapter_parameters("policy").items()}
    bb.zero_grad(set_to_none=True)

    loss = response_logprobs(bb, bb, batch).sum()
    with bb.using("ref"), torch.no_grad():
        ref_lp = response_logprobs(bb, bb, batch)
    with bb.using(None), torch.no_grad():
        base_lp = response_logprobs(bb, bb, batch)
    loss.backward()
    assert not torch.allclose(ref_lp, base_lp)  # the reference adapter really was active
    for n, p in bb.adapter_parameters("policy").items():
        assert p.grad is not None, f"gradient dropped for {n}"
        torch.testing.assert_close(p.grad, expected[n])
    assert all(p.grad is None for p in bb.adapter_parameters("ref").values())


def test_saved_adapter_loads_with_peft_and_gives_same_logits(tiny_backbone, batch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bb = tiny_backbone
    bb.add_adapter("sft", AdapterConfig(dropout=0.0))
    train_steps(bb, batch, n=2)
    bb.save_adapter("sft", tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained("models/tiny-llama")
    peft_model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    bb.eval()
    with torch.no_grad():
        ours = bb.lm_logits(bb(batch["input_ids"], batch["attention_mask"]))
        theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-5)
    # and loading it back as a frozen adapter on our backbone reproduces it too
    bb.load_adapter("copy", tmp_path, trainable=False)
    with torch.no_grad():
        again = bb.lm_logits(bb(batch["input_ids"], batch["attention_mask"]))
    torch.testing.assert_close(again, ours)


def test_nf4_quantized_base_trains_lora_on_cpu(batch):
    bb = Backbone.load(ModelConfig(path="tiny", quantization="nf4"))
    assert any("4bit" in type(m).__name__ for m in bb.causal_lm.modules())
    bb.add_adapter("sft", AdapterConfig())
    a0 = {n: p.detach().clone() for n, p in bb.adapter_parameters("sft").items()}
    train_steps(bb, batch, n=2)
    assert any(not torch.equal(p, a0[n]) for n, p in bb.adapter_parameters("sft").items())


def test_pad_token_is_not_eos(tiny_backbone):
    tok = tiny_backbone.tokenizer
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_missing_model_dir_names_the_fix():
    with pytest.raises(FileNotFoundError, match="make model"):
        Backbone.load(ModelConfig(path="models/SmolLM2-nope"))


class FrozenMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the matrix multiplies by a weight that does not train (the frozen base's)."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        weight = {aten.mm.default: 1, aten.addmm.default: 2}.get(func)
        if weight is not None and not args[weight].requires_grad:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_recomputes_no_frozen_matmul(batch):
    """``selective`` keeps what the frozen base's matmuls computed: its backward multiplies by frozen weights
    exactly as often as a backward without checkpointing, while full checkpointing runs them again."""
    counts = {}
    for gc in (False, True, "selective"):
        torch.manual_seed(0)
        bb = Backbone.load(ModelConfig(path="tiny", gradient_checkpointing=gc))
        bb.add_adapter("d", AdapterConfig(r=4, alpha=8, dropout=0.0))
        bb.train()
        with bb.using("d"):
            loss = bb(batch["input_ids"], batch["attention_mask"]).pow(2).mean()
        with FrozenMatmuls() as mode:
            loss.backward()
        counts[gc] = mode.count
    n_layers = bb.causal_lm.config.num_hidden_layers
    assert counts[True] >= counts[False] + 4 * n_layers  # the recompute: q, k, v, o, gate, up (down: early stop)
    assert counts["selective"] == counts[False]


def test_selective_replay_may_run_other_operations_than_the_forward():
    """Under ZeRO-3 a layer's weight gathers (collectives, buffer copies) run where prefetching puts them, not
    in the same places in the forward and its replay. Selective checkpointing tolerates that: only the frozen
    matmuls must match (torch's own selective contexts refuse any operation the forward did not run)."""
    from torch.utils.checkpoint import checkpoint

    from deltalign.model.recompute import checkpointing_kwargs

    frozen, delta = torch.randn(8, 8), torch.randn(8, 8, requires_grad=True)
    replaying = []

    def layer(x):
        if replaying:  # as a gather the forward did not need (its weights were prefetched)
            torch.empty(4).fill_(1.0).cos()
        return torch.tanh(x @ frozen) @ delta

    x = torch.randn(3, 8, requires_grad=True)
    plain = layer(x).sum()
    with FrozenMatmuls() as without:
        expected = torch.autograd.grad(plain, (x, delta))
    out = checkpoint(layer, x, **checkpointing_kwargs("selective"))
    replaying.append(True)
    with FrozenMatmuls() as mode:
        grads = torch.autograd.grad(out.sum(), (x, delta))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    assert mode.count == without.count  # the replay took the frozen matmul's output from the forward


def test_selective_replay_refuses_frozen_matmuls_in_another_order():
    """The kept outputs are handed back in order; a replay whose frozen matmuls change order fails loudly instead
    of reading another layer's output."""
    from torch.utils.checkpoint import checkpoint

    from deltalign.model.recompute import checkpointing_kwargs

    wide, narrow, delta = torch.randn(8, 16), torch.randn(8, 4), torch.randn(8, 8, requires_grad=True)
    replaying = []

    def layer(x):
        h = x @ delta
        a, b = (h @ narrow, h @ wide) if replaying else (h @ wide, h @ narrow)
        return torch.tanh(a).sum() + torch.tanh(b).sum()

    out = checkpoint(layer, torch.randn(3, 8), **checkpointing_kwargs("selective"))
    replaying.append(True)
    with pytest.raises(RuntimeError, match="another order"):
        out.backward()
