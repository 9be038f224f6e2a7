"""The model layer: devices, dtypes and presets, one adapter per backend, hook sites, SAEs, and the runtime bundle."""
