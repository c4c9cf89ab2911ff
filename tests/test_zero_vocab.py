"""Vocabulary-parallel lookup and LM-head log-probs (deltalign.zero.vocab): two gloo processes, each holding half
the rows of a table as ZeRO-3 does, give the values and gradients of the whole table -- with different numbers of
tokens per rank, several chunks, a temperature and the entropy."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

V, H = 10, 6


def _fake_partitioned(weight: torch.Tensor, rank: int, world: int) -> torch.nn.Parameter:
    """A parameter as ZeRO-3 leaves it: an empty local tensor, this rank's slice of the flattened values in
    ``ds_tensor``, not gathered."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    flat = weight.reshape(-1)
    part = -(-flat.numel() // world)
    p = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    p.ds_id, p.ds_shape, p.ds_status = 0, weight.shape, ZeroParamStatus.NOT_AVAILABLE
    p.ds_tensor = torch.cat([flat, flat.new_zeros(part * world - flat.numel())])[rank * part:(rank + 1) * part]
    return p


def _worker(rank: int, world: int, port: int, rows_split: bool) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from deltalign.zero import vocab

    vocab.CHUNK_TOKENS = 2  # several chunks per call
    torch.manual_seed(0)  # the same table on both ranks
    W = torch.randn(V if rows_split else V + 1, H, dtype=torch.float64)
    param = _fake_partitioned(W, rank, world)
    g = torch.Generator().manual_seed(10 + rank)  # different tokens per rank, different counts
    if not rows_split:  # (V + 1) x H does not split at a row: nothing partitioned-aware applies
        assert vocab.lookup(param, torch.tensor([1])) is None
        assert vocab.head_logprobs(param, torch.zeros(1, H), torch.tensor([1])) is None
        assert vocab.logits(param, torch.zeros(1, H)) is None
        dist.barrier()
        os._exit(0)  # see the end
    ids = torch.randint(0, V, (2, 3 + 2 * rank), generator=g)
    torch.testing.assert_close(vocab.lookup(param, ids), W[ids], rtol=0, atol=0)

    n = 5 - 2 * rank
    hidden = torch.randn(n, H, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (n,), generator=g)
    a, b = torch.randn(n, dtype=torch.float64, generator=g), torch.randn(n, dtype=torch.float64, generator=g)
    lp, ent = vocab.head_logprobs(param, hidden, targets, temperature=0.7, entropy=True)
    (lp * a + ent * b).sum().backward()
    ref_h = hidden.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(ref_h @ W.T / 0.7, -1)
    ref_lp = logp.gather(-1, targets[:, None]).squeeze(-1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    (ref_lp * a + ref_ent * b).sum().backward()
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    torch.testing.assert_close(hidden.grad, ref_h.grad)
    lp_only = vocab.head_logprobs(param, hidden.detach()[:, None], targets[:, None], 0.7)  # any leading shape
    torch.testing.assert_close(lp_only, ref_lp.detach()[:, None])
    with torch.no_grad():  # generation's next-token scores: every row's full logits
        torch.testing.assert_close(vocab.logits(param, hidden[:, None]), (hidden @ W.T)[:, None])
    assert vocab.logits(param, hidden) is None  # a gradient wanted: not this path
    # both ranks done, then out without running destructors: tearing gloo down at exit (with or without
    # destroy_process_group) aborted a worker about 1 run in 10 ("terminate called without an active exception")
    dist.barrier()
    os._exit(0)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rows_split", [True, False])
def test_two_ranks_give_the_whole_tables_values_and_gradients(rows_split):
    mp.spawn(_worker, args=(2, _port(), rows_split), nprocs=2, join=True)
