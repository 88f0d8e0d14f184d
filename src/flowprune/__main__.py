import sys

from flowprune.cli import main

sys.exit(main())
