import sys

from fastmirror.cli.main import main

sys.exit(main())
