"""Deployment assets: gateway and kit templates, conda env files, offline bundles, the firewall checklist."""
