import sys

from minigpt import main

sys.exit(main())
