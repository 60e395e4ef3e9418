"""KVM's side of a TDVMCALL: register cache, leaf table, handlers, platform and TDX exit handling."""
