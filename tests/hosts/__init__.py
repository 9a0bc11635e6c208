"""Multi-host tests: a coordinator and sites as network namespaces (reused by the fault tests)."""
