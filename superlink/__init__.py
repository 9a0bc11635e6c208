"""Coordinator side: SuperLink, ServerApp executor and the Fleet gateway, supervised together."""
