"""`python -m ipex_llm_tf` runs the command line."""
import sys

from .cli import main

sys.exit(main())
