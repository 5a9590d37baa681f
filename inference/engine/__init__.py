"""The engine: loads models and runs their forward passes, knowing nothing about HTTP."""
