"""Synthetic releases for trying the tool: the ChestX-ray14-shaped demo and the learnable task."""
