"""Site side: preflight checks and the supervised, outbound-only flower-supernode."""
