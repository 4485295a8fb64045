"""Parallel wiring: process groups and the CPU shims for megatron-core."""
