"""What every layer shares: errors, credential redaction, the machine's faults, processes, the environment record."""
