"""``tdvmcall trace``: real hosts' ``kvm_exit`` traces audited against the hardened policy."""
