import sys

from .._cli import plain_warnings
from .cli import main

plain_warnings()

sys.exit(main())
