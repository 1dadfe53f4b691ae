"""Preference data: sources, formats, normalization to the canonical schema, and tokenization."""
