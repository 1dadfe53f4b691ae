"""What training optimizes: the DPO losses, the reference model and its resolver, Liger's fused loss."""
