"""A naive PPO as a memory baseline: four separate model copies in memory — policy, reference, reward model, critic.

    python bench/naive_ppo.py --settings JSON

The textbook layout (and TRL's PPO without peft): each role is its own full copy of the checkpoint (fp32 on cpu;
on ``--device cuda`` runs, ``Settings.device`` / ``dtype``: bf16 on the GPU, as ours). To isolate
what sharing one backbone saves, everything else is as in our PPO stage: the policy and the critic train LoRA
deltas with the same rank / targets (the critic also a scalar head), the reference and reward model are frozen,
the same rollout batch, minibatch, PPO epochs, response length, temperature and KL coefficient, and the same pure
loss functions (``deltalign.losses``). Reported: samples/s (same window and FLOP convention as ``common.py``) and
peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, Settings, StepTimer, data_for, emit, model_dims, set_threads, torch_dtype  # noqa: E402
from ours import ppo_work  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", required=True)
    args = ap.parse_args()
    s = Settings.from_json(args.settings)
    os.chdir(ROOT)
    set_threads(s.threads)

    import torch
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

    from deltalign.data.tokenize import load_tokenizer
    from deltalign.model.modes import train_without_dropout
    from deltalign.data.formats import load_rows, prompt_examples
    from deltalign.data.tokenize import tokenize_prompt
    from deltalign.core.memory import release_free_memory
    from deltalign.sampling.generation import stop_token_ids
    from deltalign.losses import (gae_advantages, kl_penalty_rewards, masked_whiten, ppo_policy_loss, ppo_value_loss,
                                  token_logprobs)

    torch.manual_seed(s.seed)
    path = ROOT / s.model
    dev, dtype = torch.device(s.device), torch_dtype(s.dtype)
    tok = load_tokenizer(path)
    lora = dict(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, target_modules=s.target_modules,
                bias="none")

    # the four copies
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
                            LoraConfig(task_type="CAUSAL_LM", **lora)).to(dev)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval().requires_grad_(False)
    reward = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype).to(dev)
    reward.eval().requires_grad_(False)
    critic = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    critic.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(**lora), critic.model)
    critic.to(dev)
    for n, p in critic.named_parameters():
        p.requires_grad_("lora_" in n or n.startswith("score."))
    for m in (policy, critic):
        m.eval()  # dropout off, as in our stage and TRL's
        if s.ppo_gradient_checkpointing:  # as ours: training mode (transformers checkpoints only then), dropout off
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            train_without_dropout(m)
    params = [p for m in (policy, critic) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr)

    # prompts
    examples = prompt_examples(load_rows(data_for('ppo', s)), data_for('ppo', s))
    prompts = [tokenize_prompt(ex.prompt, tok, ex.conversational) for ex in examples]
    prompts = [p for p in prompts if len(p) <= s.max_prompt_length]
    g = torch.Generator().manual_seed(s.seed)
    order = torch.randperm(len(prompts), generator=g).tolist()
    stops = stop_token_ids(tok)
    gen_cfg = GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=True, temperature=s.temperature,
                               top_p=1.0, top_k=0, eos_token_id=stops, pad_token_id=tok.pad_token_id)

    timer, dims = StepTimer(), model_dims(s.model)
    B = s.batch_size

    def hidden_positions(p_lens, R):
        return torch.stack([torch.arange(p - 1, p - 1 + R) for p in p_lens]).to(dev)

    for step in range(s.ppo_steps):
        batch_prompts = [prompts[i] for i in order[step * B:(step + 1) * B]]
        # rollout (left-padded for generation)
        P = max(len(p) for p in batch_prompts)
        ids = torch.full((B, P), tok.pad_token_id)
        am = torch.zeros(B, P, dtype=torch.long)
        for b, p in enumerate(batch_prompts):
            ids[b, P - len(p):], am[b, P - len(p):] = torch.tensor(p), 1
        ids, am = ids.to(dev), am.to(dev)
        with torch.no_grad():
            out = policy.generate(input_ids=ids, attention_mask=am, generation_config=gen_cfg)
        responses = []
        for row in out[:, P:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            responses.append(row[:cut])
        timer.add(samples=B, **ppo_work(dims, [len(p) for p in batch_prompts], [len(r) for r in responses],
                                        s.ppo_epochs))
        # right-padded prompt + response rows
        R = max(len(r) for r in responses)
        T = max(len(p) + len(r) for p, r in zip(batch_prompts, responses))
        x = torch.full((B, T), tok.pad_token_id)
        xm = torch.zeros(B, T, dtype=torch.long)
        rids = torch.full((B, R), tok.pad_token_id)
        rmask = torch.zeros(B, R)
        for b, (p, r) in enumerate(zip(batch_prompts, responses)):
            x[b, :len(p) + len(r)], xm[b, :len(p) + len(r)] = torch.tensor(p + r), 1
            rids[b, :len(r)], rmask[b, :len(r)] = torch.tensor(r), 1.0
        x, xm, rids, rmask = x.to(dev), xm.to(dev), rids.to(dev), rmask.to(dev)
        pos = hidden_positions([len(p) for p in batch_prompts], R).clamp(max=T - 1)

        def lm_logprobs(model, rows):
            logits = model(input_ids=x[rows], attention_mask=xm[rows]).logits
            logits = logits.gather(1, pos[rows].unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float() / s.temperature
            return token_logprobs(logits, rids[rows])

        def values(rows):
            h = critic.model(input_ids=x[rows], attention_mask=xm[rows]).last_hidden_state
            return critic.score(h).squeeze(-1).gather(1, pos[rows]).float()  # fp32 maths under a bf16 base

        allrows = torch.arange(B, device=dev)
        with torch.no_grad():
            old_lp = lm_logprobs(policy, allrows)
            ref_lp = lm_logprobs(ref, allrows)
            old_v = values(allrows)
            h = reward.model(input_ids=x, attention_mask=xm).last_hidden_state
            last = xm.sum(1) - 1
            score = reward.score(h).squeeze(-1)[torch.arange(B, device=dev), last].float()
        rewards, _ = kl_penalty_rewards(score, old_lp, ref_lp, rmask, s.kl_coef)
        adv, returns = gae_advantages(rewards, old_v, rmask, 1.0, 0.95)
        adv = masked_whiten(adv, rmask)
        release_free_memory()
        for _ in range(s.ppo_epochs):
            for mb in torch.randperm(B, generator=g).to(dev).split(s.ppo_mini_batch_size):
                lp = lm_logprobs(policy, mb)
                pg_loss, _ = ppo_policy_loss(lp, old_lp[mb], adv[mb], rmask[mb], 0.2)
                vf_loss, _ = ppo_value_loss(values(mb), old_v[mb], returns[mb], rmask[mb], 0.2)
                (pg_loss + 0.1 * vf_loss).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        release_free_memory()  # as our PPO stage does at its phase boundaries
        timer.step_end()

    emit({"side": "naive", "stage": "ppo", **timer.summary(), "threads": s.threads})
    return 0


if __name__ == "__main__":
    sys.exit(main())
