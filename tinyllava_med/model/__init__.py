"""Model core: loading, conversion, variant registry, prompts and generation."""
