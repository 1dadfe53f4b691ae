"""Artifacts on disk and where inputs come from: manifests and digests, the base record, the Hub, DVC deps."""
