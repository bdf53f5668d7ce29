"""The entry points (python -m experiments.NAME). Each one first calls
`host_memory.configure_early()` (emo_jax/host_memory.py), then imports what it uses."""
