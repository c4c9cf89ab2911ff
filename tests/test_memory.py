"""The process's memory: the peak a stage reached (reset at its start), and handing freed heap back."""

import torch

from deltalign.core import memory


def test_peak_covers_what_the_stage_allocated_and_resets_between_stages():
    memory.reset_peak()
    base = memory.peak()["host_gib"]
    x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    high = memory.peak()["host_gib"]
    assert high - base >= 60 / 1024
    del x
    memory.release_free_memory()
    memory.reset_peak()  # the next stage's peak starts from what is resident now, not from the last one's
    assert memory.peak()["host_gib"] < high - 30 / 1024


def test_peak_names_the_device_only_where_there_is_one():
    assert ("device_gib" in memory.peak()) == torch.cuda.is_available()


def test_resident_is_what_the_process_holds_now():
    memory.reset_peak()
    assert 0.05 < memory.resident() <= memory.peak()["host_gib"] + 0.01


def _two_ranks(rank: int, init: str, out: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    memory.reset_peak()
    x = torch.ones((rank * 256) << 20, dtype=torch.uint8)  # rank 1 touches 256 MiB more than rank 0
    peaks = memory.peak_of_all_processes(memory.peak())
    del x
    dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(peaks, f)


def test_the_peak_of_several_processes_is_the_largest_and_lists_each(tmp_path):
    """Under several processes a stage's peak is the largest process's (what each must be given), with every
    process's own figure beside it: rank 0 alone hides a rank that holds more."""
    import json

    import torch.multiprocessing as mp

    out = str(tmp_path / "peaks")
    mp.spawn(_two_ranks, args=(f"file://{tmp_path / 'rendezvous'}", out), nprocs=2)
    peaks = [json.loads(open(f"{out}.{r}").read()) for r in (0, 1)]
    assert peaks[0] == peaks[1]  # every process gets the same answer
    each = peaks[0]["processes"]
    assert len(each) == 2 and each[1]["host_gib"] - each[0]["host_gib"] > 200 / 1024
    assert peaks[0]["host_gib"] == max(p["host_gib"] for p in each)


def test_one_process_peak_is_its_own():
    memory.reset_peak()
    mine = memory.peak()
    assert memory.peak_of_all_processes(mine) == mine  # no process group: nothing to gather, no list


def test_available_is_what_the_machine_can_still_give():
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) / 2**20
    assert 0.05 < memory.available() <= total


def test_a_container_limit_caps_what_is_available_and_the_total(tmp_path, monkeypatch):
    """Inside a container whose memory cgroup sets a limit, the host's /proc/meminfo overstates both: the
    budget of model.gradient_checkpointing=auto must come from the limit."""
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text(f"{2 << 30}\n")
    usage.write_text(f"{1 << 29}\n")
    monkeypatch.setattr(memory, "CGROUP", {str(limit): str(usage)})
    monkeypatch.setattr(memory, "on_device", lambda: False)
    assert memory.available() == 1.5 and memory.total() == 2.0
    limit.write_text("max\n")  # no limit: the host's figures
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) / 2**20
    assert memory.total() == total and memory.available() <= total
