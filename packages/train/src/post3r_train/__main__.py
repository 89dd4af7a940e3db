"""`python -m post3r_train ...` (what torchrun and the local launcher run): the train CLI."""

from post3r_train.cli import main

raise SystemExit(main())
