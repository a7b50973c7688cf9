import sys

from mpis.cli import main

sys.exit(main())
