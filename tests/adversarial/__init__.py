"""The adversarial suite: import-escape fuzzing, a DoS and crash corpus, protocol abuse, and
chaos under load, on both engines. The fast tier runs by default; ``pytest -m soak`` runs the
long tier, and ``python -m tests.adversarial.report`` turns a soak run into
docs/RELIABILITY.md."""
