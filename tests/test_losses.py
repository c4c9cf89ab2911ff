"""Tests for deltalign.losses. Every expected value is worked out by hand with math.log and math.exp."""

import math

import pytest
import torch

from deltalign import losses as L

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def close(a, b, tol=1e-9):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), atol=tol, rtol=0)


def softplus(x):  # -log sigmoid(-x) == log(1 + e^x)
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------------------- SFT

LOGITS = [[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, 0.0, -1.0]]]
LABELS = [[2, -100, 0]]
LP0 = 3.0 - math.log(math.exp(1) + math.exp(2) + math.exp(3))
LP2 = 2.0 - math.log(math.exp(2) + math.exp(0) + math.exp(-1))


def test_token_logprobs_hand_values_and_ignore():
    lp = L.token_logprobs(t(LOGITS), torch.tensor(LABELS))
    assert lp.shape == (1, 3)
    close(lp, [[LP0, 0.0, LP2]])


def test_token_logprobs_runs_in_float32_for_bf16_logits():
    lp = L.token_logprobs(t(LOGITS).to(torch.bfloat16), torch.tensor(LABELS))
    assert lp.dtype == torch.float32


def test_sft_loss_sum_hand_value_count_and_gradient():
    logits = t(LOGITS).requires_grad_()
    loss_sum, n = L.sft_loss_sum(logits, torch.tensor(LABELS))
    close(loss_sum, -(LP0 + LP2))
    assert int(n) == 2
    loss_sum.backward()
    # d(-log softmax_y)/dz = softmax - onehot. The ignored position gets no gradient.
    z = LOGITS[0][0]
    p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    close(logits.grad[0, 0], [p[0], p[1], p[2] - 1.0])
    close(logits.grad[0, 1], [0.0, 0.0, 0.0])


# ---------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_plain():
    loss, m = L.bradley_terry_loss(t([2.0, 0.5]), t([1.0, 1.5]))
    close(loss, [softplus(-1.0), softplus(1.0)])
    close(m["accuracy"], 0.5)
    close(m["margin"], 0.0)


def test_bradley_terry_margin_and_magnitude():
    loss, _ = L.bradley_terry_loss(t([2.0, 0.5]), t([1.0, 1.5]), margin=t([0.5, 0.0]))
    close(loss, [softplus(-0.5), softplus(1.0)])
    loss, _ = L.bradley_terry_loss(t([2.0, 0.5]), t([1.0, 1.5]), margin=t([0.5, 0.0]), magnitude_coef=0.1)
    close(loss, [softplus(-0.5) + 0.1 * 3.0**2, softplus(1.0) + 0.1 * 2.0**2])


def test_bradley_terry_gradient_pushes_chosen_up():
    rc, rr = t([0.3]).requires_grad_(), t([0.1]).requires_grad_()
    L.bradley_terry_loss(rc, rr)[0].sum().backward()
    s = 1 / (1 + math.exp(-0.2))
    close(rc.grad, [-(1 - s)])
    close(rr.grad, [1 - s])


# -------------------------------------------------------------------- DPO family

PC, PR, RC, RR = -5.0, -7.0, -6.0, -6.5  # h = (1.0) - (-0.5) = 1.5


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 7.0])
def test_dpo_is_ln2_when_policy_equals_reference(beta):
    x, y = t([-3.0, -11.0]), t([-4.0, -2.5])
    loss, cr, rr = L.dpo_sigmoid_loss(x, y, x.clone(), y.clone(), beta)
    close(loss, [math.log(2.0)] * 2, tol=1e-15)
    close(cr, [0.0, 0.0])
    close(rr, [0.0, 0.0])


def test_dpo_hand_value_rewards_and_label_smoothing():
    loss, cr, rr = L.dpo_sigmoid_loss(t([PC]), t([PR]), t([RC]), t([RR]), beta=0.1)
    close(loss, [softplus(-0.15)])
    close(cr, [0.1])
    close(rr, [-0.05])
    loss, _, _ = L.dpo_sigmoid_loss(t([PC]), t([PR]), t([RC]), t([RR]), beta=0.1, label_smoothing=0.1)
    close(loss, [0.9 * softplus(-0.15) + 0.1 * softplus(0.15)])


def test_dpo_gradient_pushes_chosen_up_rejected_down():
    pc, pr = t([-4.0]).requires_grad_(), t([-4.0]).requires_grad_()
    loss, cr, _ = L.dpo_sigmoid_loss(pc, pr, t([-4.0]), t([-4.0]), beta=0.1)
    assert not cr.requires_grad
    loss.sum().backward()
    close(pc.grad, [-0.1 * 0.5])  # -beta * sigmoid(-beta h), with h = 0
    close(pr.grad, [0.1 * 0.5])


def test_ipo_hand_values():
    loss, cr, rr = L.ipo_loss(t([PC]), t([PR]), t([RC]), t([RR]), beta=0.5)
    close(loss, [(1.5 - 1.0) ** 2])
    close(cr, [0.5])
    close(rr, [-0.25])
    # Length-normalised (TRL) form: 1.0/2 - (-0.5)/5 = 0.6
    loss, _, _ = L.ipo_loss(t([PC]), t([PR]), t([RC]), t([RR]), beta=0.5, chosen_len=t([2]), rejected_len=t([5]))
    close(loss, [(0.6 - 1.0) ** 2])
    with pytest.raises(ValueError):
        L.ipo_loss(t([PC]), t([PR]), t([RC]), t([RR]), beta=0.5, chosen_len=t([2]))


def test_simpo_hand_value():
    # beta=2: chosen reward 2*(-6/3) = -4, rejected reward 2*(-12/4) = -6, gamma 0.5
    loss, cr, rr = L.simpo_loss(t([-6.0]), t([-12.0]), torch.tensor([3]), torch.tensor([4]), beta=2.0, gamma=0.5)
    close(loss, [softplus(-(-4.0 + 6.0 - 0.5))])
    close(cr, [-4.0])
    close(rr, [-6.0])


# --------------------------------------------------------------------------- PPO


def test_masked_mean():
    x, m = t([[1.0, 2.0], [3.0, 4.0]]), t([[1, 0], [1, 1]])
    close(L.masked_mean(x, m), 8.0 / 3.0)
    close(L.masked_mean(x, m, dim=1), [1.0, 3.5])
    close(L.masked_mean(x, torch.zeros_like(m)), 0.0)


def test_masked_whiten_hand_and_random():
    x, m = t([[1.0, 2.0, 3.0, 100.0]]), t([[1, 1, 1, 0]])
    # mean 2, unbiased var (1 + 0 + 1) / 2 = 1
    close(L.masked_whiten(x, m), [[-1.0, 0.0, 1.0, 0.0]], tol=1e-7)
    close(L.masked_whiten(x, m, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], tol=1e-7)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, generator=g, dtype=D) * 3 + 5
    m = (torch.rand(4, 9, generator=g) > 0.3).to(D)
    w = L.masked_whiten(x, m)[m.bool()]
    close(w.mean(), 0.0, tol=1e-7)
    close(w.std(), 1.0, tol=1e-7)
    with pytest.raises(ValueError):
        L.masked_whiten(x, torch.zeros_like(m))


def test_masked_whiten_over_processes_uses_the_global_statistics():
    # two processes holding the same shard: all_sum doubles every sum; the result must be that of the
    # concatenated batch (n doubles, so the Bessel factor changes: a per-process whitening would differ)
    x, m = t([[1.0, 2.0, 3.0, 100.0]]), t([[1, 1, 1, 0]])
    both = L.masked_whiten(torch.cat([x, x]), torch.cat([m, m]))[:1]
    close(L.masked_whiten(x, m, all_sum=lambda v: 2 * v), both, tol=1e-7)
    # mean 2, unbiased var over 6 entries (4 * 1) / 5 = 0.8
    close(both, [[-1 / 0.8 ** 0.5, 0.0, 1 / 0.8 ** 0.5, 0.0]], tol=1e-7)
    assert not torch.allclose(both, L.masked_whiten(x, m))


def test_kl_penalty_rewards_score_on_last_response_token():
    lp = t([[-1.0, -2.0, -3.0, -4.0], [-1.0, -2.0, -3.0, -4.0]])
    ref = t([[-1.5, -2.0, -2.5, 0.0], [-1.5, -2.0, -2.5, 0.0]])
    mask = t([[1, 1, 1, 0], [0, 1, 1, 1]])  # right padding, then a left-padded row
    rewards, kl = L.kl_penalty_rewards(t([2.0, -1.0]), lp, ref, mask, kl_coef=0.1)
    close(kl, [[0.5, 0.0, -0.5, 0.0], [0.0, 0.0, -0.5, -4.0]])
    close(rewards, [[-0.05, 0.0, 0.05 + 2.0, 0.0], [0.0, 0.0, 0.05, 0.4 - 1.0]])


def test_gae_three_steps_by_hand():
    r, v, m = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), t([[1, 1, 1]])
    a2 = 1.0 - 0.7
    a1 = (0.7 - 0.6) + 0.95 * a2
    a0 = (0.6 - 0.5) + 0.95 * a1
    adv, ret = L.gae_advantages(r, v, m, gamma=1.0, lam=0.95)
    close(adv, [[a0, a1, a2]])
    close(ret, [[a0 + 0.5, a1 + 0.6, a2 + 0.7]])


def test_gae_mask_ends_early_and_left_padding():
    # The junk after the response must not leak into it.
    r, v, m = t([[0.0, 1.0, 5.0, 5.0]]), t([[0.5, 0.6, 9.0, 9.0]]), t([[1, 1, 0, 0]])
    a1 = 1.0 - 0.6
    a0 = (0.6 - 0.5) + 0.95 * a1
    adv, ret = L.gae_advantages(r, v, m, gamma=1.0, lam=0.95)
    close(adv, [[a0, a1, 0.0, 0.0]])
    close(ret, [[a0 + 0.5, a1 + 0.6, 0.0, 0.0]])
    # Response after a masked prompt token, with gamma=0.9 and lam=0.5
    adv, _ = L.gae_advantages(t([[7.0, 0.0, 1.0]]), t([[3.0, 0.5, 0.2]]), t([[0, 1, 1]]), gamma=0.9, lam=0.5)
    a2 = 1.0 - 0.2
    a1 = (0.9 * 0.2 - 0.5) + 0.9 * 0.5 * a2
    close(adv, [[0.0, a1, a2]])


def test_ppo_policy_loss_clipped_and_unclipped():
    ratios = [1.1, 1.5, 1.5, 0.5, 3.0]
    adv = t([[1.0, 1.0, -1.0, -1.0, 9.0]])
    mask = t([[1, 1, 1, 1, 0]])
    old = t([[0.0] * 5])
    lp = t([[math.log(r) for r in ratios]]).requires_grad_()
    loss, m = L.ppo_policy_loss(lp, old, adv, mask, clip=0.2)
    # Per token: -1.1 (not clipped), -1.2 (clipped at 1.2), 1.5 (not clipped: pessimistic), 0.8 (clipped at 0.8)
    close(loss, (-1.1 - 1.2 + 1.5 + 0.8) / 4)
    close(m["clipfrac"], 0.5)
    close(m["approx_kl"], sum(r - 1 - math.log(r) for r in ratios[:4]) / 4)
    loss.backward()
    # d/dlogp of -A*ratio is -A*ratio/4. Clipped and masked tokens get 0.
    close(lp.grad, [[-1.1 / 4, 0.0, 1.5 / 4, 0.0, 0.0]])


def test_ppo_policy_loss_unclipped_single():
    loss, m = L.ppo_policy_loss(t([[math.log(1.1)]]), t([[0.0]]), t([[2.0]]), t([[1]]))
    close(loss, -2.0 * 1.1)
    close(m["clipfrac"], 0.0)


def test_ppo_value_loss_clip():
    values = t([[1.5, 1.1, 2.5, 1.5, 7.0]])
    old = t([[1.0, 1.0, 1.0, 1.0, 0.0]])
    ret = t([[2.0, 2.0, 2.0, 1.3, 0.0]])
    mask = t([[1, 1, 1, 1, 0]])
    loss, m = L.ppo_value_loss(values, old, ret, mask, clip=0.2)
    # v_clip = [1.2, 1.1, 1.2, 1.2]
    per = [max(0.25, 0.64), 0.81, max(0.25, 0.64), max(0.04, 0.01)]
    close(loss, 0.5 * sum(per) / 4)
    close(m["clipfrac"], 2 / 4)


def test_entropy_from_logits():
    h = L.entropy_from_logits(t([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), 0.0, -math.inf]]]))
    h2 = -(0.2 * math.log(0.2) * 2 + 0.6 * math.log(0.6))
    close(h, [[math.log(4.0), h2]])


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_direction_and_state_roundtrip():
    c = L.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    c.update(12.0, n_steps=100)  # error is clipped to +0.2
    assert math.isclose(c.value, 0.2 * (1 + 0.2 * 100 / 10000))
    v = c.value
    c.update(6.6, n_steps=100)  # error +0.1
    assert math.isclose(c.value, v * (1 + 0.1 * 100 / 10000))
    v = c.value
    c.update(torch.tensor(1.0), n_steps=100)  # below target: error is clipped to -0.2
    assert math.isclose(c.value, v * (1 - 0.2 * 100 / 10000)) and c.value < v
    c2 = L.AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    c2.load_state_dict(c.state_dict())
    assert c2.state_dict() == c.state_dict()
    c.update(3.0, 10)
    c2.update(3.0, 10)
    assert c2.value == c.value


def test_fixed_kl_controller():
    c = L.FixedKLController(0.05)
    c.update(100.0, 1000)
    assert c.value == 0.05
    c2 = L.FixedKLController(1.0)
    c2.load_state_dict(c.state_dict())
    assert c2.value == 0.05


# ------------------------------------------------------- critic-free group RL (GRPO family)

GROUPS = [[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0]]


def test_zero_variance_groups_counts_groups_whose_rewards_are_all_equal():
    flags = L.zero_variance_groups(t([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [2.0, 2.0, 2.0], [0.5, 0.5, 0.50001]]))
    assert flags.tolist() == [True, False, True, False]


def test_grpo_advantages_group_mean_and_unbiased_std():
    std = math.sqrt((4 * 0.25) / 3)  # Bessel: sum of squares / (G - 1)
    close(L.grpo_advantages(t(GROUPS)), [[0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4),
                                          0.5 / (std + 1e-4)], [0.0] * 4])
    close(L.grpo_advantages(t([[0.0, 1.0, 2.0]])), [[-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4)]])  # std 1


def test_dr_grpo_advantages_subtract_the_group_mean_only():
    close(L.dr_grpo_advantages(t(GROUPS)), [[0.5, -0.5, -0.5, 0.5], [0.0] * 4])
    close(L.dr_grpo_advantages(t([[0.0, 10.0, 20.0]])), [[-10.0, 0.0, 10.0]])  # no std scaling


def test_rloo_advantages_leave_one_out_baseline():
    close(L.rloo_advantages(t(GROUPS)), [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0] * 4])
    # 0 - (1 + 5)/2, 1 - (0 + 5)/2, 5 - (0 + 1)/2
    close(L.rloo_advantages(t([[0.0, 1.0, 5.0]])), [[-3.0, -1.5, 4.5]])
    with pytest.raises(ValueError, match="at least 2"):
        L.rloo_advantages(t([[1.0]]))


def test_k3_kl_hand_value_and_zero_when_equal():
    close(L.k3_kl(t([math.log(0.5)]), t([math.log(0.25)])), [0.5 - math.log(0.5) - 1])  # e^d - d - 1, d = ref - lp
    close(L.k3_kl(t([-1.3]), t([-1.3])), [0.0])
    assert bool((L.k3_kl(t([-3.0, -0.1, -2.0]), t([-0.2, -2.5, -2.0])) >= 0).all())


# rows are single tokens: ratio, advantage, mask (the last row is masked out)
RATIOS, ADV, MASK1 = [1.5, 1.5, 0.5, 0.5, 1.25, 9.0], [1.0, -1.0, -1.0, 1.0, 2.0, 5.0], [1, 1, 1, 1, 1, 0]


def _clip_inputs():
    old = t([[-1.0]] * 6)
    lp = (old + t([[math.log(r)] for r in RATIOS])).requires_grad_()
    return lp, old, t(ADV), t([[m] for m in MASK1])


def test_clipped_policy_loss_asymmetric_clipping_by_hand():
    lp, old, adv, mask = _clip_inputs()
    per_token, m = L.clipped_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # 1.5 with A>0 clips at 1 + 0.28; 1.5 with A<0 is pessimistic (unclipped); 0.5 with A<0 clips at 1 - 0.2;
    # 0.5 with A>0 unclipped; 1.25 with A=2 is inside the high clip (a symmetric 0.2 would clip it)
    close(per_token.detach(), [[-1.28], [1.5], [0.8], [-0.5], [-2.5], [0.0]])
    close(m["clip_high"], 1 / 5)
    close(m["clip_low"], 1 / 5)
    close(m["approx_kl"], sum((r - 1) - math.log(r) for r in RATIOS[:5]) / 5)
    assert "kl" not in m
    per_token.sum().backward()  # d(-A r)/d logp = -A r where unclipped, 0 where the clip is active
    close(lp.grad, [[0.0], [1.5], [0.0], [-0.5], [-2.5], [0.0]])
    _, sym = L.clipped_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    close(sym["clip_high"], 2 / 5)


def test_clipped_policy_loss_k3_kl_term_to_the_reference():
    lp = t([[math.log(0.5), -1.0]])
    ref = t([[math.log(0.25), -1.0]])
    kl = 0.5 - math.log(0.5) - 1
    per_token, m = L.clipped_policy_loss(lp, lp.clone(), t([0.0]), t([[1, 1]]), 0.2, 0.28, ref_logprobs=ref, beta=0.1)
    close(per_token, [[0.1 * kl, 0.0]])  # ratio 1, advantage 0: only beta * k3
    close(m["kl"], kl / 2)
    close(m["approx_kl"], 0.0)
    close(m["clip_low"], 0.0)
    close(m["clip_high"], 0.0)


PER_TOKEN = [[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]]  # the 9s sit on masked positions
MASK2 = [[1, 1, 1], [1, 0, 0]]


def test_loss_aggregations_by_hand():
    s, n = L.token_loss_sum(t(PER_TOKEN), t(MASK2))  # DAPO: every token of the batch weighs the same
    close(s, 10.0), close(n, 4.0)
    s, n = L.sequence_loss_sum(t(PER_TOKEN), t(MASK2))  # GRPO: mean per sequence, then over sequences
    close(s, 2.0 + 4.0), close(n, 2.0)
    s, n = L.constant_loss_sum(t(PER_TOKEN), t(MASK2), max_tokens=5)  # Dr. GRPO: sum / (sequences x 5)
    close(s, 10.0), close(n, 10.0)


@pytest.mark.parametrize("agg", ["token", "sequence", "constant"])
def test_loss_aggregations_split_over_processes_sum_to_the_global_value(agg):
    f = {"token": L.token_loss_sum, "sequence": L.sequence_loss_sum,
         "constant": lambda x, m: L.constant_loss_sum(x, m, max_tokens=4)}[agg]
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.5, 0.0, 0.0], [7.0, 8.0, 0.0]])
    m = t([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]])
    s, n = f(x, m)
    parts = [f(x[:2], m[:2]), f(x[2:], m[2:])]  # two processes, each dividing by the global count
    total = sum(p[1] for p in parts)
    close(total, n)
    close(sum(p[0] / total for p in parts), s / n)
