"""``tdvmcall sweep`` and ``tdvmcall vectors``: every mask through every call, conformance vectors."""
