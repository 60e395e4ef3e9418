"""``tdvmcall check``: real guests' call sites (a catalog) judged against a host."""
