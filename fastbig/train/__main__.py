"""``python -m fastbig.train MODEL [options]``."""
import sys

from . import main

sys.exit(main())
