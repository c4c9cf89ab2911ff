"""The losses users reach for next (issue 36): KTO, ORPO, GSPO, CISPO and DAPO's soft overlong penalty.

Every expected value is worked out by hand with math.log / math.exp, and each convention is the one of TRL 1.12
where the issue says so (trl/trainer/kto_trainer.py, trl/experimental/orpo/orpo_trainer.py,
trl/trainer/grpo_trainer.py, trl/rewards/other_rewards.py).
"""

import math

import pytest
import torch

from deltalign import losses as L

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def close(a, b, tol=1e-9):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), atol=tol, rtol=0)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ------------------------------------------------------------------------------------------------- KTO


def test_kto_mismatched_rows_never_pair_a_prompt_with_its_own_answer():
    # split pairs put siblings side by side: a rotation by one would pair row 0 (prompt a) with row 1 (prompt a)
    keys = ["a", "a", "b", "b", "c", "c"]
    j = L.kto_mismatched_rows(keys)
    assert len(j) == len(keys)
    assert all(keys[i] != keys[k] for i, k in enumerate(j))
    assert L.kto_mismatched_rows(["a", "b"]) == [1, 0]
    # all prompts distinct: TRL's rotation, row i with the completion of row i - 1
    # (trl/trainer/kto_trainer.py: KL_completion_ids = [completion_ids[-1]] + completion_ids[:-1])
    rows = list(range(4))
    assert L.kto_mismatched_rows(["w", "x", "y", "z"]) == rows[-1:] + rows[:-1] == [3, 0, 1, 2]


def test_kto_mismatched_rows_need_two_prompts():
    with pytest.raises(ValueError, match="at least two different prompts"):
        L.kto_mismatched_rows(["a", "a", "a"])
    with pytest.raises(ValueError, match="at least two different prompts"):
        L.kto_mismatched_rows(["a"])


def test_kto_reference_point_is_a_clamped_detached_mean_of_sums():
    pol, ref = t([-3.0, -5.0, -2.0]).requires_grad_(), t([-4.0, -4.0, -4.0])
    s, n = L.kto_kl_sum(pol, ref)
    close(s, (1.0 - 1.0 + 2.0)), close(n, 3.0)
    close(L.kto_reference_point(s, n), 2.0 / 3)
    assert not L.kto_reference_point(s, n).requires_grad
    close(L.kto_reference_point(t(-2.0), t(3.0)), 0.0)  # clamped at 0
    # two processes: the global mean of the sums, not the mean of per-process means (TRL's)
    a, na = L.kto_kl_sum(t([1.0]), t([0.0]))
    b, nb = L.kto_kl_sum(t([0.0, 0.0, 0.0]), t([0.0, 0.0, 0.0]))
    close(L.kto_reference_point(a + b, na + nb), 0.25)


def test_kto_loss_by_hand():
    # row 0 desirable, row 1 undesirable; log-ratios policy - reference 0.5 and 0.25; z0 = 0.1; beta 0.2
    pol, ref = t([-1.0, -2.0]).requires_grad_(), t([-1.5, -2.25])
    labels = torch.tensor([True, False])
    loss, r = L.kto_loss(pol, ref, labels, z0=t(0.1), beta=0.2, desirable_weight=1.0, undesirable_weight=1.5)
    close(loss, [1 - sigmoid(0.2 * (0.5 - 0.1)), 1.5 * (1 - sigmoid(0.2 * (0.1 - 0.25)))])
    close(r, [0.2 * 0.5, 0.2 * 0.25])
    assert not r.requires_grad
    loss.sum().backward()  # desirable: its log-prob pushed up (negative gradient); undesirable: down
    assert pol.grad[0] < 0 < pol.grad[1]


def test_kto_loss_at_the_reference_with_z0_zero_is_one_half():
    lp = t([-3.0, -4.0, -5.0])
    loss, _ = L.kto_loss(lp, lp, torch.tensor([True, False, True]), z0=t(0.0), beta=0.1)
    close(loss, [0.5, 0.5, 0.5])


# ------------------------------------------------------------------------------------------------ ORPO


def log1mexp(x):
    return math.log(1 - math.exp(x))


def test_log1mexp_is_stable_at_both_ends():
    x = t([-1e-6, -0.1, -0.6931, -5.0, -50.0])
    close(L.log1mexp(x), [math.log(-math.expm1(v)) for v in x.tolist()], tol=1e-12)
    assert torch.isfinite(L.log1mexp(t([-1e-12, -800.0]))).all()


def test_orpo_odds_ratio_term_by_hand():
    # length-averaged log-probs of chosen and rejected
    lc, lr = t([-0.5, -2.0]).requires_grad_(), t([-1.0, -1.0])
    loss, log_odds, rc, rr = L.orpo_odds_loss(lc, lr, lam=0.1)
    want = [(-0.5 + 1.0) - (log1mexp(-0.5) - log1mexp(-1.0)), (-2.0 + 1.0) - (log1mexp(-2.0) - log1mexp(-1.0))]
    close(log_odds, want)
    close(loss, [-0.1 * math.log(sigmoid(w)) for w in want])  # λ·(-log σ(log-odds)), per pair
    close(rc, [0.1 * -0.5, 0.1 * -2.0]), close(rr, [-0.1, -0.1])  # TRL logs λ·(average log-prob)
    loss.sum().backward()
    assert lc.grad[0] < 0 and lc.grad[1] < 0  # raising the chosen likelihood lowers the loss


def test_orpo_equal_responses_cost_lambda_ln2():
    lp = t([-0.7, -3.0])
    loss, log_odds, _, _ = L.orpo_odds_loss(lp, lp, lam=0.5)
    close(log_odds, [0.0, 0.0]), close(loss, [0.5 * math.log(2)] * 2)


# ------------------------------------------------------------------------------------------ GSPO (sequence)


def test_gspo_sequence_ratio_is_exp_of_the_masked_mean_log_ratio_clipped_per_sequence():
    # two sequences: token log-ratios (0.001, 0.003) -> mean 0.002; (-0.01, pad) -> mean -0.01
    old = t([[-1.0, -2.0], [-1.5, -3.0]])
    lp = (old + t([[0.001, 0.003], [-0.01, 7.0]])).requires_grad_()  # 7.0 sits on a masked position
    mask = t([[1, 1], [1, 0]])
    adv = t([1.0, -1.0])
    per_token, m = L.sequence_clipped_policy_loss(lp, old, adv, mask, clip_low=3e-4, clip_high=4e-4)
    s0, s1 = math.exp(0.002), math.exp(-0.01)
    # seq 0: A>0, ratio above 1 + 4e-4 -> clipped at 1.0004; seq 1: A<0, ratio below 1 - 3e-4 -> clipped at 0.9997
    close(per_token.detach(), [[-1.0004, -1.0004], [0.9997, 0.0]])
    close(m["ratio"], (s0 + s1) / 2)
    close(m["clip_high"], 0.5), close(m["clip_low"], 0.5)
    per_token.sum().backward()
    close(lp.grad, torch.zeros(2, 2))  # both clipped: no gradient


def test_gspo_unclipped_gradient_is_the_sequence_ratio_times_the_mean_token_gradient():
    old = t([[-1.0, -2.0, -0.5]])
    lp = (old + t([[0.0001, -0.0001, 0.5]])).requires_grad_()
    mask = t([[1, 1, 0]])
    per_token, _ = L.sequence_clipped_policy_loss(lp, old, t([2.0]), mask, clip_low=3e-4, clip_high=4e-4)
    close(per_token.detach(), [[-2.0, -2.0, 0.0]])  # mean log-ratio 0: ratio exactly 1
    loss, n = L.sequence_loss_sum(per_token, mask)
    (loss / n).backward()  # d(-A s)/d logp_t = -A s / |y| on each of the |y| = 2 tokens
    close(lp.grad, [[-1.0, -1.0, 0.0]])


def test_gspo_first_pass_equals_token_level_grpo():
    torch.manual_seed(0)
    lp = torch.randn(3, 4, dtype=D)
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    adv = t([0.5, -1.0, 2.0])
    seq, _ = L.sequence_clipped_policy_loss(lp, lp.clone(), adv, mask, 3e-4, 4e-4)
    tok, _ = L.clipped_policy_loss(lp, lp.clone(), adv, mask, 0.2, 0.28)
    close(seq, tok)


def test_gspo_k3_term_is_per_token():
    lp = t([[math.log(0.5), -1.0]])
    ref = t([[math.log(0.25), -1.0]])
    per_token, m = L.sequence_clipped_policy_loss(lp, lp.clone(), t([0.0]), t([[1, 1]]), 3e-4, 4e-4,
                                                  ref_logprobs=ref, beta=0.1)
    kl = 0.5 - math.log(0.5) - 1
    close(per_token, [[0.1 * kl, 0.0]]), close(m["kl"], kl / 2)


# ----------------------------------------------------------------------------------------------- CISPO


def test_cispo_clips_the_detached_weight_from_above_only():
    old = t([[-1.0, -1.0, -1.0]])
    lp = (old + t([[math.log(8.0), math.log(0.1), 0.0]])).requires_grad_()
    mask = t([[1, 1, 1]])
    per_token, m = L.cispo_policy_loss(lp, old, t([2.0]), mask, eps_max=5.0)
    # weights: min(8, 5) = 5, 0.1 (no lower clip), 1; loss_t = -w A logp_t
    logp = lp.detach()[0].tolist()
    close(per_token.detach(), [[-5 * 2 * logp[0], -0.1 * 2 * logp[1], -1 * 2 * logp[2]]])
    close(m["clip_high"], 1 / 3)
    per_token.sum().backward()  # every token keeps a gradient: -w A
    close(lp.grad, [[-10.0, -0.2, -2.0]])


def test_cispo_with_negative_advantage_and_mask():
    old = t([[-2.0, -2.0]])
    lp = (old + t([[math.log(6.0), 0.3]])).requires_grad_()
    per_token, m = L.cispo_policy_loss(lp, old, t([-1.0]), t([[1, 0]]), eps_max=5.0)
    close(per_token.detach(), [[5.0 * lp.detach()[0, 0].item(), 0.0]])
    s, n = L.token_loss_sum(per_token, t([[1, 0]]))
    close(n, 1.0)
    s.backward()
    close(lp.grad, [[5.0, 0.0]])


# ----------------------------------------------------------------------------------- DAPO overlong penalty


def test_soft_overlong_penalty_by_hand():
    # L_max 100, cache 20: <= 80 nothing; 90 -> -0.5 (TRL's docstring example); 100 -> -1; beyond -> -1
    close(L.soft_overlong_penalty(torch.tensor([10, 80, 81, 90, 100, 130]), max_tokens=100, cache=20),
          [0.0, 0.0, -1 / 20, -0.5, -1.0, -1.0])
    close(L.soft_overlong_penalty(torch.tensor([99, 100]), max_tokens=100, cache=0), [0.0, 0.0])


def test_soft_overlong_penalty_rejects_a_cache_beyond_the_budget():
    with pytest.raises(ValueError, match="cache"):
        L.soft_overlong_penalty(torch.tensor([1]), max_tokens=10, cache=11)
