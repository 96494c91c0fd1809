"""``python -m unetseg`` (also what ``torchrun -m unetseg`` runs)."""

from unetseg.cli import main

raise SystemExit(main())
