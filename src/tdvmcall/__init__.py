"""tdvmcall: an executable model of the TDX TDVMCALL register path (guest, TDX module, KVM)."""

__version__ = "0.1.0"
