"""The model's own commands: ``run`` (one call, every register), ``decode`` (a value from a log) and
``leaves`` (the leaf table)."""
