"""Interop with the Hugging Face ecosystem and with MiniMind's own checkpoints.

`export` writes a checkpoint as a directory stock `transformers` loads (Llama or Qwen3 layout for
dense models, bundled modeling code for MoE, a peft adapter for LoRA runs); `importer` reads such a
directory, or a state dict saved by the public MiniMind training scripts, back into our checkpoint.
"""
