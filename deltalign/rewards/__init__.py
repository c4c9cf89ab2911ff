"""Rewards: the deterministic constraint checker (verifiable rewards) and reward-model helpers."""
