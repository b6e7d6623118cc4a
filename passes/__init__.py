"""The FX passes of the spts backend: locate -> verify -> plan -> rewrite (and a dense clean-up)."""
