import sys

from dermray.cli import main

sys.exit(main())
