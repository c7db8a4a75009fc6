"""The reward model r(x, c): P(an expert judges image x plausible as declared class c)."""
