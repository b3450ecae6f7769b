import sys

from qdemo.cli import main

sys.exit(main())
