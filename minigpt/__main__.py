import sys

from minigpt_core.cli import main

sys.exit(main())
