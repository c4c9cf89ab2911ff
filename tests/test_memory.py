"""The process's memory: the peak a stage reached (reset at its start), and handing freed heap back."""

import torch

from deltalign import memory


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
