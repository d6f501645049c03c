"""The bottom layer: plumbing every stage uses, and nothing of qarac_dist's own. The two kinds
of user mistake (errors.py), atomic JSON files (files.py), the one exclusive-lock helper
(lock.py), secret redaction (secrets.py), a free port for a rendezvous (ports.py), and the sweep
directory's layout, the one place its paths are spelled (layout.py). No torch, no I/O at import."""
