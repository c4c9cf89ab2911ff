"""Shared-prefix packing: each token prefix that several rows share is computed once (a trie per packed row,
tree attention mask, depth-based positions), and callers see the same hidden states as the plain padded batch."""

import pytest
import torch

from deltalign.model.backbone import AdapterConfig
from deltalign.model.labelled import labelled_hidden, response_logprobs
from deltalign.data.batching import pad_batch, pair_batch, to_device
from deltalign.data.sharing import prefix_tree


def test_trie_layout_by_hand():
    b = pad_batch([[1, 2, 5], [1, 2, 3, 4], [7]], pad_id=0)
    s = prefix_tree(b["input_ids"], b["attention_mask"])
    # sorted: [1,2,3,4] < [1,2,5] < [7]; tokens 1,2 stored once
    assert s["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7]]
    assert s["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0]]
    m = s["mask"][0, 0].int().tolist()
    assert m[4] == [1, 1, 0, 0, 1, 0]  # token 5 sees 1, 2 and itself, not 3, 4
    assert m[3] == [1, 1, 1, 1, 0, 0]
    assert m[5] == [0, 0, 0, 0, 0, 1]
    assert s["cols"][0, :3].tolist() == [0, 1, 4] and s["cols"][1].tolist() == [0, 1, 2, 3]
    assert s["cols"][2, 0].item() == 5 and s["rows"].unique().tolist() == [0]
    assert s["n_tokens"] == 6


def test_budget_splits_into_rows_padded_with_self_attending_pads():
    seqs = [[i, i + 1, i + 2, i + 3] for i in range(10, 60, 10)]  # 5 rows, nothing shared
    b = pad_batch(seqs, pad_id=0)
    s = prefix_tree(b["input_ids"], b["attention_mask"], budget=9)
    assert s["input_ids"].shape == (3, 8)
    assert s["real"].sum().item() == 20
    for r in range(3):  # every position attends at least to itself: no all-masked row in the attention
        assert s["mask"][r, 0].diagonal().all()
    got = s["input_ids"][s["rows"], s["cols"]]
    assert torch.equal(got, b["input_ids"])


def test_left_padding_is_refused():
    b = pad_batch([[1, 2, 3], [4]], pad_id=0, pad_side="left")
    with pytest.raises(ValueError, match="right-padded"):
        prefix_tree(b["input_ids"], b["attention_mask"])


def _pairs(n=3):
    g = torch.Generator().manual_seed(5)
    sys_prompt = [5, 6, 7, 8]
    out = []
    for i in range(n):
        p = sys_prompt + torch.randint(10, 250, (3 + i,), generator=g).tolist()
        out.append({"prompt_ids": p, "chosen_ids": torch.randint(10, 250, (4,), generator=g).tolist(),
                    "rejected_ids": torch.randint(10, 250, (2 + i,), generator=g).tolist()})
    return out


def test_attention_runs_over_the_rows_where_that_is_cheaper():
    branches = pad_batch([[1, 2, 3] + [10 + i] * 6 for i in range(8)], pad_id=0)  # 8 rows of 9, 51 nodes
    s = prefix_tree(branches["input_ids"], branches["attention_mask"])
    assert "owner" in s  # 8 * 81 / 2 scores per layer over the rows, 51^2 over the packed row
    own = s["owner"][0]
    assert torch.equal(s["input_ids"][0], branches["input_ids"].flatten()[own])
    trunk = pad_batch([list(range(1, 40)) + [50 + i] for i in range(4)], pad_id=0)  # 4 rows of 40, 43 nodes
    assert "owner" not in prefix_tree(trunk["input_ids"], trunk["attention_mask"])
    assert "owner" not in prefix_tree(branches["input_ids"], branches["attention_mask"], attend="tree")
    assert "owner" in prefix_tree(trunk["input_ids"], trunk["attention_mask"], attend="rows")


DELTAS = {"lora": AdapterConfig(r=4, dropout=0.0), "prefix": AdapterConfig(method="prefix", prefix_length=3),
          "prompt": AdapterConfig(method="prompt", prompt_length=2)}


@pytest.mark.parametrize("method, attend, attention", [
    *[(m, a, "sdpa") for m in DELTAS for a in ("rows", "tree")], *[(m, "tree", "eager") for m in DELTAS]])
def test_shared_forward_matches_plain_values_and_gradients(tiny_backbone, method, attend, attention, monkeypatch):
    """Packed with shared prefixes, the same log-probs, hidden states and delta gradients as the padded batch --
    for prompt learning too: prefix keys/values and soft-prompt tokens are a prefix every packed node sees."""
    from deltalign.deltas import row_attention

    calls = []
    real = row_attention.attend_rows
    monkeypatch.setattr(row_attention, "attend_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    bb = tiny_backbone
    bb.causal_lm.set_attn_implementation(attention)  # eager adds the tree mask to the scores as a float
    assert bb.causal_lm.config._attn_implementation == attention
    bb.add_adapter("policy", DELTAS[method])
    with torch.no_grad():
        for p in bb.adapter_parameters("policy").values():
            p.add_(torch.randn_like(p) * 0.1)
    bb.activate("policy")
    plain = pair_batch(_pairs(), pad_id=0)
    shared = dict(plain, shared=prefix_tree(plain["input_ids"], plain["attention_mask"], attend=attend))
    assert shared["shared"]["n_tokens"] < plain["n_tokens"]

    grads = []
    outs = []
    for batch in (plain, shared):
        bb.zero_grad()
        lp = response_logprobs(bb, bb, batch)
        lp.sum().backward()
        outs.append(lp.detach())
        grads.append(torch.cat([p.grad.flatten() for p in bb.adapter_parameters("policy").values()]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
    assert grads[0].abs().sum() > 0

    h_plain, t_plain, _ = labelled_hidden(bb, plain)
    h_shared, t_shared, _ = labelled_hidden(bb, to_device(shared, "cpu"))
    assert torch.equal(t_plain, t_shared)
    torch.testing.assert_close(h_shared, h_plain, atol=1e-5, rtol=1e-5)
    # the tiny model attends with sdpa: the row path is taken, except with virtual tokens (the tree mask holds them)
    assert bool(calls) == (attend == "rows" and method == "lora" and attention == "sdpa")


def test_reward_head_reads_the_same_last_token(tiny_backbone):
    from deltalign.rewards.model import last_token_values

    bb = tiny_backbone
    bb.add_adapter("rm", AdapterConfig(r=4, dropout=0.0))
    bb.add_head("rm")
    bb.activate("rm")
    plain = pair_batch(_pairs(4), pad_id=0)
    s = prefix_tree(plain["input_ids"], plain["attention_mask"])
    a = last_token_values(bb(plain["input_ids"], plain["attention_mask"], head="rm"), plain["attention_mask"])
    b = last_token_values(bb(plain["input_ids"], plain["attention_mask"], head="rm", shared=s),
                          plain["attention_mask"])
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_prompt_learning_deltas_share_too(tiny_backbone):
    bb = tiny_backbone
    for name, cfg in DELTAS.items():
        bb.add_adapter(f"d-{name}", cfg)
        assert bb.can_share_prefixes(), name


def test_a_batch_that_shares_little_runs_padded():
    """Packing has a cost of its own (the trie's gathers, attention over rows): a batch whose shared prefixes save
    less than MIN_SAVING of its tokens runs padded; pairs sharing their prompt run packed."""
    from deltalign.data.sharing import MIN_SAVING, with_prefix_tree, saving

    torch.manual_seed(0)
    rows = [[1, 2] + torch.randint(3, 90, (38,)).tolist() for _ in range(4)]  # 2 of 40 tokens shared
    little = pad_batch(rows, 0)
    assert saving(little["input_ids"], little["attention_mask"]) == pytest.approx(6 / 160)
    assert "shared" not in with_prefix_tree(little, True)
    prompt = torch.randint(3, 90, (30,)).tolist()
    pairs = pad_batch([prompt + torch.randint(3, 90, (10,)).tolist() for _ in range(2)], 0)
    assert saving(pairs["input_ids"], pairs["attention_mask"]) == pytest.approx(30 / 80)
    assert 30 / 80 > MIN_SAVING
    assert "shared" in with_prefix_tree(pairs, True)
    assert "shared" not in with_prefix_tree(pad_batch([prompt, prompt[:10]], 0), False)
