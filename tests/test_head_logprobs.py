"""Log-probs and entropy through the LM head, a chunk of tokens at a time: the same values and gradients as
full-vocabulary logits, without the [N, V] logits (or their gradient) of the whole batch existing at once."""

import math

import torch

from deltalign.losses import entropy_from_logits, head_logprobs, token_logprobs


def _reference(hidden, weight, targets, temperature):
    logits = (hidden @ weight.T) / temperature
    return token_logprobs(logits, targets), entropy_from_logits(logits)


def test_values_match_hand_computed_two_token_vocabulary():
    # hidden [1, 1] = 1, weight rows (2, 0): logits (2, 0) at temperature 2 -> (1, 0)
    h = torch.tensor([[1.0]])
    w = torch.tensor([[2.0], [0.0]])
    lp, ent = head_logprobs(h, w, torch.tensor([0]), temperature=2.0, entropy=True)
    p0 = math.exp(1) / (math.exp(1) + 1)
    assert abs(lp.item() - math.log(p0)) < 1e-6
    assert abs(ent.item() - (-(p0 * math.log(p0) + (1 - p0) * math.log(1 - p0)))) < 1e-6


def test_values_and_gradients_match_full_logits_in_any_chunking():
    torch.manual_seed(0)
    N, H, V = 11, 7, 13
    w = torch.randn(V, H, dtype=torch.float64)
    t = torch.randint(0, V, (N,))
    for chunk in (1, 4, 11, 100):
        h1 = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
        h2 = h1.detach().clone().requires_grad_(True)
        g_lp, g_ent = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
        lp, ent = head_logprobs(h1, w, t, temperature=0.7, entropy=True, chunk_tokens=chunk)
        lp_ref, ent_ref = _reference(h2, w, t, 0.7)
        torch.testing.assert_close(lp, lp_ref)
        torch.testing.assert_close(ent, ent_ref)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        ((lp_ref * g_lp).sum() + (ent_ref * g_ent).sum()).backward()
        torch.testing.assert_close(h1.grad, h2.grad)


def test_gradient_of_log_probs_alone_and_gradcheck():
    torch.manual_seed(1)
    w = torch.randn(9, 5, dtype=torch.float64)
    t = torch.randint(0, 9, (6,))
    h = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    for temp in (1.0, 1.3):  # at 1.0 the backward skips its scaling
        assert torch.autograd.gradcheck(lambda x: head_logprobs(x, w, t, temp, chunk_tokens=4), (h,))
        assert torch.autograd.gradcheck(lambda x: head_logprobs(x, w, t, temp, entropy=True, chunk_tokens=4)[1],
                                        (h,))
    # entropy returned but only log-probs used: the entropy's backward is skipped, the gradient unchanged
    lp, ent = head_logprobs(h, w, t, 1.3, entropy=True, chunk_tokens=4)
    (g1,) = torch.autograd.grad(lp.sum(), h)
    (g2,) = torch.autograd.grad(head_logprobs(h, w, t, 1.3, chunk_tokens=4).sum(), h)
    torch.testing.assert_close(g1, g2)


def test_leading_dimensions_are_kept():
    torch.manual_seed(2)
    h = torch.randn(2, 3, 4)
    w = torch.randn(5, 4)
    t = torch.randint(0, 5, (2, 3))
    lp = head_logprobs(h, w, t, 1.0, chunk_tokens=2)
    assert lp.shape == (2, 3)
    torch.testing.assert_close(lp, _reference(h.reshape(6, 4), w, t.reshape(6), 1.0)[0].reshape(2, 3))
