"""``python -m robust_rlhf.cli`` runs the console command."""

import sys

from .main import main

sys.exit(main())
