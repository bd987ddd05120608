"""The MoE layer step, written once against the Backend interface."""
