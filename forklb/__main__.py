import sys

from forklb.cli import main

sys.exit(main())
