"""Thin stage commands: each reads its inputs, calls the library, and writes one artifact directory."""
