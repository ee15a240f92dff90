"""`python -m engine.study`: see engine.study.cli."""

import sys

from engine.study.cli import main

sys.exit(main())
