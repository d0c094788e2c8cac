import sys

from transferlab.cli.main import main

sys.exit(main())
