import sys

from fastmirror.cli import main

sys.exit(main())
