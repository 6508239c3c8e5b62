import sys

from pyqshare.cli import main

sys.exit(main())
