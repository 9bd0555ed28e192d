import sys

from sparsespec.cli import main

sys.exit(main())
