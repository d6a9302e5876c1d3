import sys

from omni2.engine.cli.main import main

sys.exit(main())
