import sys

from sfdaseg.cli import main

sys.exit(main())
