"""Triton kernels and their launchers: triton + torch, nothing else."""
