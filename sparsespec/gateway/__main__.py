import sys

from sparsespec.gateway.server import main

sys.exit(main())
