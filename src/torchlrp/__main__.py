"""``python -m torchlrp``: the command line (:mod:`torchlrp.cli`)."""
from torchlrp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
