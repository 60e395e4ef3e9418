"""tdvmcall: an executable model of the TDX TDVMCALL register path (guest, TDX module, KVM)."""

__version__ = "0.1.0"


def data_file(name: str):  # -> importlib.resources.abc.Traversable
    """A table shipped in ``tdvmcall/data/`` (with its licence notice beside it)."""
    from importlib import resources

    return resources.files(__name__).joinpath("data", name)
