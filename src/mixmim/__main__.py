import sys

from mixmim.cli import main

sys.exit(main())
