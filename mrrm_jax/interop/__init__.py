"""Interop with the PyTorch world: Hugging Face checkpoint conversion, PEFT reward-model import/export, torch files."""
