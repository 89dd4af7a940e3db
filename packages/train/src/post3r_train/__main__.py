"""`python -m post3r_train ...` (what torchrun and the local launcher run): the train CLI."""

from torch.distributed.elastic.multiprocessing.errors import record

from post3r_train.cli import main

# record: a failing worker's traceback reaches the launcher's error report.
raise SystemExit(record(main)())
