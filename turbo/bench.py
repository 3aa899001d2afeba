"""`python -m turbo.bench`, the benchmark's short name: see `turbo.fast.bench`."""

import sys

from turbo.fast.bench import main

if __name__ == "__main__":
    sys.exit(main())
