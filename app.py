"""turbo's Gradio app, as Hugging Face Spaces starts it (`app_file: app.py`) and as README's first
command runs it: python app.py [--base ID_OR_DIR] [--models-dir checkpoints] [--device cuda] ...

The page lives in turbo/app/page.py; an installed package runs the same as `turbo-app`.
"""

import sys

from turbo.app.page import main

if __name__ == "__main__":
    sys.exit(main())
