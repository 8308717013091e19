"""jumplora-server: one frozen causal LM served through many sparse JumpLoRA adapters."""
