"""Modeling and config files that `minimind export` copies beside an exported MoE model (remote code)."""
