"""``tdvmcall fuzz``: strategies, the model's properties, and the campaign."""
