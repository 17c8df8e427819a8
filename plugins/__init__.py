"""First-party lmkit plugins (compression), registered through the `lmkit.plugins` entry points."""
