import sys

from turbo.cli import main

sys.exit(main())
