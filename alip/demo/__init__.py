"""The demo: a generated noisy dataset (`data`), the end-to-end run (`python -m alip.demo`), its report (`report`)."""
