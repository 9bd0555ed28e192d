import sys

from sparsespec.runtime import tune_malloc

tune_malloc()  # before torch starts any thread (see sparsespec/runtime.py)

from verifier_service.server import main  # noqa: E402

sys.exit(main())
