"""Coordinator side: the ServerApp that aggregates until a convergence criterion is met."""
