"""Backbone-free building blocks: parameter-tree paths, sharding rules, LoRA, the value head and its losses, host malloc."""
