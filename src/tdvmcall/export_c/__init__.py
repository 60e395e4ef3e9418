"""``tdvmcall export-c``: the hardened validation generated from the leaf table as a C table and
function for KVM, proven equal to the model by running it (docs/kvm.md)."""
