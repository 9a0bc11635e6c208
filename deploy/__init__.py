"""Deployment assets: the nginx Fleet-gateway template (later: conda files, systemd units, checklists)."""
